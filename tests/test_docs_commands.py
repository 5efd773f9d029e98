"""Docs that are run (issue 18): every shell block in README.md and docs/**/*.md runs here, or names the test that
covers it, so a command on a page cannot drift from the code without a test failing with the page's file:line.

- A page in RUN_PAGES runs its shell blocks in order, as one bash script (`set -euo pipefail`), in a
  pseudo-terminal (tests/docs_pages.py): a fresh working directory, HOME and the XDG directories in the test's
  temporary directory, no MURMUR_HOME (the pages use the default data directory), one OpenMP thread, and
  `murmur` of this checkout first on PATH. The test waits for what the page says comes, then presses Ctrl-C
  where the page says to; at the end every process of the script's session is stopped, even on failure. A
  `toml` block with `title="FILE"` is saved as FILE first, as the page tells its reader to.
- Two settings come from the environment instead of the page, and are the only ones: `MURMUR_RUN_HOST_MADDRS`
  keeps the peers' DHT on loopback (the page's default listens on every interface), and `MURMUR_RUN_DEVICE=cpu`
  keeps training where the suite plans for it (`--device auto` would take a GPU the machine may have).
- What a page cannot run as written (a public address, values a run owner publishes) is replaced by the
  substitution tables below, each entry saying why; an entry that stops matching exactly once fails.
- Any other shell block carries `<!-- docs-test: covered by tests/FILE.py::TEST (why) -->` on the line before
  it, and that test must exist. Every `toml` block must be a config murmur accepts: a run config as
  `murmur create-run --config` reads it, or a `murmur run --config` file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click
import docs_pages as docs
import pytest
from click.testing import CliRunner

from peer.lab.harness import MADDR_LINE, MURMUR, Procs, murmur, wait_until

ROOT = Path(__file__).resolve().parent.parent
VOLUNTEER, RUN_OWNER = "docs/volunteer.md", "docs/run-owner.md"
RUN_PAGES = {VOLUNTEER, RUN_OWNER}
"""The pages whose shell blocks this file runs (the tests below: one per page)."""

LOOPBACK_NODE = "--host-maddrs /ip4/127.0.0.1/tcp/0"
OWNER_SUBSTITUTIONS = {
    # A bootstrap node on a public host listens on every interface at a fixed port and announces the host's
    # public address; the test has neither to give, so each node listens on loopback, on any free port.
    "--host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/203.0.113.7/tcp/31337": LOOPBACK_NODE,
    "--host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/203.0.113.8/tcp/31337": LOOPBACK_NODE,
}


def volunteer_substitutions(boot: str, key: str) -> dict[str, str]:
    """The two values a volunteer copies from a run's announcement: the test's own swarm on loopback (a bootstrap
    node and the owner's peer, started from docs/run-owner.md's run.toml) stands in for the public run."""
    return {
        "BOOT=/ip4/203.0.113.7/tcp/31337/p2p/QmVZ8UhA8y4N7xAR5DkZ7mTJ8eqQXdB9cXnJWkHqE7xLfT": f"BOOT={boot}",
        "KEY=15508bf947d6dca50a7b7d044de07fd60bbe03b1a22e647af339ec15eca36748": f"KEY={key}",
    }


ROUND_EXCHANGED = r"^round \d+ loss \S+ tok/s \d+ slice \d+ exchanged [1-9]"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(page: Path) -> tuple[list[docs.Block], list[str]]:
    return docs.read_blocks(page, page.relative_to(ROOT).as_posix())


def page_blocks(shown: str) -> list[docs.Block]:
    blocks, problems = blocks_of(ROOT / shown)
    if problems:
        raise docs.DocsError("\n".join(problems))
    return blocks


@pytest.mark.timeout(60)
def test_every_shell_block_is_run_here_or_names_the_test_that_covers_it() -> None:
    problems: list[str] = []
    for page in pages():
        blocks, found = blocks_of(page)
        problems += found + docs.unaccounted(blocks, RUN_PAGES, "RUN_PAGES in tests/test_docs_commands.py")
        problems += [p for b in blocks for p in docs.missing_tests(b, ROOT)]
    tables = {RUN_OWNER: OWNER_SUBSTITUTIONS, VOLUNTEER: volunteer_substitutions("BOOT", "KEY")}
    for shown, table in tables.items():
        problems += docs.page_script(page_blocks(shown), table)[2]
    if problems:
        raise docs.DocsError("\n".join(problems))


def config_refusal(block: docs.Block, tmp: Path) -> str | None:
    """Why murmur refuses the toml `block` both as a run config (through `create-run --config` itself) and as a
    `murmur run --config` file; None when it takes it as one of them."""
    from peer.cli.main import main
    from peer.cli.run import config_defaults, run

    path = tmp / f"block-{block.line}.toml"
    path.write_text(block.text)
    made = CliRunner().invoke(main, ["create-run", "--config", str(path), "--key", str(tmp / "owner.key"),
                                     "--out", str(tmp / f"manifest-{block.line}.json")])  # fmt: skip
    if made.exit_code == 0:
        return None
    try:
        config_defaults(run, path)
        return None
    except click.BadParameter as exc:
        return (f"{block.where}: a ```toml block murmur refuses: as a run config, {made.output.strip()!r}; as a "
                f"`murmur run --config` file, {exc.format_message()!r}")  # fmt: skip


@pytest.mark.timeout(60)
def test_every_toml_block_is_a_config_murmur_accepts(tmp_path: Path) -> None:
    blocks = [b for page in pages() for b in blocks_of(page)[0] if b.lang == "toml"]
    assert len(blocks) >= 3, [b.where for b in blocks]  # the run-owner's run.toml, the reference one, a peer.toml
    problems = [p for b in blocks if (p := config_refusal(b, tmp_path)) is not None]
    if problems:
        raise docs.DocsError("\n".join(problems))


@pytest.mark.timeout(60)
def test_a_block_no_test_runs_fails_with_its_file_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```sh\nmurmur demo\n```\n\n"
        "<!-- docs-test: covered by tests/test_docs_commands.py::no_such_test (why) -->\n```bash\nmake x\n```\n"
        "<!-- docs-test: covered by tests/test_docs_commands.py::test_a_block_no_test_runs_fails_with_its_file_and_line"
        " (this one) -->\n```sh\nmake y\n```\n\n```\nplain\n```\n<!-- docs-test: covers nothing -->\n\n"
        "  ```console\n  $ murmur status\n  swarm x: no live peers\n  ```\n"
    )  # fmt: skip
    blocks, problems = docs.read_blocks(page, "docs/page.md")
    problems += docs.unaccounted(blocks, set(), "RUN_PAGES") + [p for b in blocks for p in docs.missing_tests(b, ROOT)]
    assert [(p.split(": ", 1)[0], re.sub(r"[:;,] .*", "", p.split(": ", 1)[1])) for p in problems] == [
        ("docs/page.md:16", "a code block without a language"),
        ("docs/page.md:19", "cannot read this docs-test comment"),
        ("docs/page.md:3", "a ```sh block that no test runs"),
        ("docs/page.md:21", "a ```console block that no test runs"),
        ("docs/page.md:8", "covered by 'tests/test_docs_commands.py::no_such_test'"),
    ]
    assert blocks[-1].commands() == "murmur status\n"
    script, origins, drifted = docs.page_script(blocks, {"murmur demo": "murmur demo --peers 2", "gone": "x"})
    line = script.splitlines().index("murmur demo --peers 2") + 1
    assert drifted == ["docs/page.md: the substitution of 'gone' matches 0 times, not once"]
    assert docs.failed_line(f"...\ndocs-test: script line {line} exited 2\n", origins) == "docs/page.md:4: exited 2"


def page_env(home: Path) -> dict[str, str]:
    """A user's environment whose home is `home`: no MURMUR_* setting of the suite's, the XDG directories under
    `home`, and this checkout's `murmur` first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MURMUR_")}
    return {**env, "HOME": str(home), "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
            "PATH": f"{Path(MURMUR).parent}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "TERM": "xterm", "MURMUR_RUN_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0", "MURMUR_RUN_DEVICE": "cpu"}  # fmt: skip


def run_page(shown: str, tmp: Path, substitutions: dict[str, str], steps: tuple[docs.CtrlC, ...]) -> tuple[str, Path]:
    """Run the page's shell blocks as a user would in a terminal (`steps`: the Ctrl-C presses it asks for); the
    screen and the working directory. Fails with the page's file:line of a failing command."""
    blocks = page_blocks(shown)
    workdir, home = tmp / "page", tmp / "home"
    workdir.mkdir()
    home.mkdir()
    for block in blocks:
        if block.lang == "toml" and block.title:
            (workdir / block.title).write_text(block.text)
    script, origins, problems = docs.page_script(blocks, substitutions)
    if problems:
        raise docs.DocsError("\n".join(problems))
    (tmp / "page.sh").write_text(script)
    term = docs.Terminal(tmp / "page.sh", workdir, page_env(home), log=tmp / "terminal.log")
    try:
        try:
            docs.press_when_seen(term, workdir, steps)
            code = term.wait_exit(240)
        except AssertionError as exc:
            raise AssertionError(f"{docs.failed_line(term.text(), origins) or shown}: {exc}") from None
        screen = term.text()
        assert code == 0, f"{docs.failed_line(screen, origins) or shown}\n{term.tail()}"
        wait_until(lambda: not docs.session_pids(term.popen.pid), 60, f"{shown}: every process it started has stopped")
        return screen, workdir
    finally:
        term.close()


def saved_on_stop(log: str, home: Path) -> Path:
    """The checkpoint a peer logged saving as it stopped (its last), which must be on disk in the default data
    directory under `home`, and the peer must have left the swarm after it."""
    saved = re.findall(r"checkpoint saved: (\S+) \(round \d+\)", log)
    assert saved and "left swarm pydocs-tiny" in log.rpartition(saved[-1])[2], log
    path = Path(saved[-1])
    assert path.is_dir() and path.is_relative_to(home / ".local" / "share" / "murmur" / "checkpoints"), path
    return path


@pytest.mark.slow(43)
@pytest.mark.timeout(600)
def test_run_owner_page(tmp_path: Path) -> None:
    # the owner watches until the table lists its peer, which has trained a round, and the plot is drawn
    watched = ((None, r"^swarm pydocs-tiny: 1 live peer"), ("owner.log", r"^round \d+ "), ("swarm-loss.png", "PNG"))
    steps = (docs.CtrlC(watched),)
    screen, workdir = run_page(RUN_OWNER, tmp_path, OWNER_SUBSTITUTIONS, steps)
    boots = [re.match(MADDR_LINE, (workdir / f"boot{i}-addrs.txt").read_text()) for i in (1, 2)]
    assert all(boots), screen
    key = (workdir / "create-run.txt").read_text().split()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", key) and (workdir / "manifest.json").exists()
    published = rf"^murmur run --swarm pydocs-tiny --initial-peers {re.escape(boots[0][1])} --run-key {key}$"
    assert re.search(published, screen, re.M), screen
    owner_log = (workdir / "owner.log").read_text()
    owner = re.search(r"^identity \S+ \(new\): peer ([0-9a-f]{16})$", owner_log, re.M)
    assert owner and re.search(rf"^{owner[1]}  127\.0\.0\.1:\d+ ", screen, re.M), screen  # status listed it
    assert (workdir / "swarm-loss.png").stat().st_size > 1000
    saved_on_stop(owner_log, tmp_path / "home")  # after the page's SIGTERM


def start_swarm(procs: Procs) -> tuple[str, str, str]:
    """The public run a volunteer joins, on loopback: a bootstrap node and the owner's peer of run-owner.md's
    run.toml; (its bootstrap address, the run key, the owner's peer id prefix)."""
    run_toml = next(b for b in page_blocks(RUN_OWNER) if b.title == "run.toml")
    (procs.workdir / "run.toml").write_text(run_toml.text)
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    made = procs.run("create-run", murmur("create-run", "--config", "run.toml", "--key", "owner.key"))
    assert made.popen.returncode == 0, made.logs()
    maddr = boot.wait_for(MADDR_LINE, timeout=60)[1]
    owner = procs.start("owner", murmur(
        "run", "--swarm", "pydocs-tiny", "--initial-peers", maddr, "--manifest", "manifest.json", "--key", "owner.key",
        "--identity", "owner.id", "--listen", "127.0.0.1:0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
        "--device", "cpu", "--eval-every", "0", "--no-checkpoints",
    ), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    peer = owner.wait_for(r"^identity owner\.id \(new\): peer ([0-9a-f]{16})$", timeout=60)[1]
    owner.wait_for(r"^round \d+ ", timeout=240)
    return maddr, made.lines[-1], peer


@pytest.mark.slow(100)
@pytest.mark.timeout(600)
def test_volunteer_page(procs: Procs, tmp_path: Path) -> None:
    boot, key, owner = start_swarm(procs)
    assert "SWARM=pydocs-tiny\n" in docs.page_script(page_blocks(VOLUNTEER), {})[0], "not run-owner.md's swarm"
    resumed_and_trains = (("murmur.log", r"^resumed from the checkpoint of round"), ("murmur.log", ROUND_EXCHANGED))
    steps = (
        docs.CtrlC(((None, ROUND_EXCHANGED),)),  # the one line joined and traded an update with the owner
        docs.CtrlC(((None, r"^swarm pydocs-tiny: 2 live peer"), *resumed_and_trains)),  # watched the swarm a while
    )
    screen, workdir = run_page(VOLUNTEER, tmp_path, volunteer_substitutions(boot, key), steps)
    data = tmp_path / "home" / ".local" / "share" / "murmur"
    me = re.search(rf"^identity {re.escape(str(data / 'identity.key'))} \(new\): peer ([0-9a-f]{{16}})$", screen, re.M)
    assert me, screen
    assert re.search(r"^reachability: OK", screen, re.M) and re.search(ROUND_EXCHANGED, screen, re.M), screen
    assert re.search(r"round \d+ \| slice \d/2 \| loss \S+ \| \S+ tok/s \| partners \d+ \| peers \d+ \|", screen)
    assert json.loads((data / "pins.json").read_text()) == {"pydocs-tiny": key}
    log = (workdir / "murmur.log").read_text()
    assert re.search(rf"^identity \S+ \(kept\): peer {me[1]}$", log, re.M), log
    resumed = re.search(r"^resumed from the checkpoint of round (\d+)", log, re.M)
    listed = re.search(rf"/checkpoints/pydocs-tiny/{me[1]}:\n(.*)", screen)  # what the page's `ls` showed
    assert resumed and listed and f"round-{int(resumed[1]):06d}" in listed[1], screen
    table = screen[screen.index("swarm pydocs-tiny: 2 live peer") :]
    assert re.search(rf"^{me[1]} ", table, re.M) and re.search(rf"^{owner} ", table, re.M), table
    assert saved_on_stop(log, tmp_path / "home").parent.name == me[1]  # after the page's SIGTERM
