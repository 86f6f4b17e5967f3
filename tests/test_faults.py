"""Crash consistency, tested the way databases test it: a fault at every write step.

Every write step of the store calls ``faults.point(NAME)`` (``indexer/faults.py``).
A reference run of the scenario below records which points each step hits and
how often; then, for each step and each point it hits (first and last hit;
every hit under ``-m slow``), the step is run again from the state before it
with one fault placed exactly there:

- SIGKILL, in a child process (a crash: nothing after that instant happens);
- KeyboardInterrupt, in this process (Ctrl-C surfacing at that instant);
- an injected I/O error (``OSError(EIO)``), in this process.

After the fault the stores must open and verify (``indexer-admin verify``'s
checks, catalog vs segments); the step is then rerun without a fault and the
result compared with the reference: the same tracks, duplicates and failures,
the same windows, and the same float16 bytes of every vector per (path,
start); the live index consistent with the catalog.

Synthetic embeddings through ``IndexStore`` directly (fast); one end-to-end
variant runs ``indexer-client`` against the bundled Triton.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.context
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mert_indexer.errors import IndexerError
from mert_indexer.indexer import faults
from mert_indexer.indexer.merge import merge_stores
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.verify import verify_store
from tests.conftest import run_cli
from tests.test_store import IDENTITY, add, make_files

ROOT = Path(__file__).resolve().parents[1]
STORES = ("idx", "shard", "merged")
BAD = "track09.mp3"  # the scenario's file that fails to decode
# Reached only while recovering from an earlier fault: covered by a fault during recovery.
RECOVERY_POINTS = {"segment.truncate"}


def _mp3s(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.mp3"))


def _copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())


def _run(store: IndexStore, folder: Path, *, prune: bool = False) -> None:
    """One indexer run over ``folder``, as indexer-client makes it, committing every 2 tracks."""
    plan = store.plan(_mp3s(folder), roots=[folder])
    store.apply(plan)
    for path, reason in plan.unreadable:
        store.record_failure(path, reason, transient=True)
    if prune:
        store.prune(plan.gone)
    for i, p in enumerate(plan.todo):
        if Path(p.path).name == BAD:
            store.record_failure(p.path, "cannot decode: invalid data")
        else:
            add(store, p)
        if i % 2:
            store.commit()
    store.commit()


def prepare_index(work: Path) -> None:
    music, music2 = work / "music", work / "music2"
    make_files(music, 5)
    _copy(music / "track01.mp3", music / "track11.mp3")  # a copy of a file not yet committed
    (music / BAD).write_bytes(b"not audio" * 100)
    make_files(music2, 2, start=20)
    _copy(music / "track02.mp3", music2 / "track22.mp3")  # the same content in the other shard


def run_index(work: Path) -> None:
    with IndexStore.open(work / "idx", IDENTITY, create=True) as store:
        _run(store, work / "music")
        store.build_index()
    with IndexStore.open(work / "shard", IDENTITY, create=True) as shard:
        _run(shard, work / "music2")


def prepare_update(work: Path) -> None:
    music = work / "music"
    os.rename(music / "track00.mp3", music / "track30.mp3")  # renamed
    (music / "track03.mp3").write_bytes(b"changed" * 700)  # changed: embedded again
    os.remove(music / "track04.mp3")  # gone: pruned
    make_files(music, 2, start=5)


def run_update(work: Path) -> None:
    with IndexStore.open(work / "idx", IDENTITY, create=True) as store:
        _run(store, work / "music", prune=True)
        store.build_index()


def run_merge(work: Path) -> None:
    merge_stores([work / "idx", work / "shard"], work / "merged")


def prepare_remerge(work: Path) -> None:
    os.remove(work / "music2" / "track20.mp3")
    make_files(work / "music2", 1, start=25)
    with IndexStore.open(work / "shard", IDENTITY, create=True) as shard:
        _run(shard, work / "music2", prune=True)


def run_remove(work: Path) -> None:
    with IndexStore.open(work / "idx", IDENTITY, create=True) as store:
        store.remove(paths=[str(work / "music" / "track05.mp3")])  # type: ignore[attr-defined]


def run_compact(work: Path) -> None:
    with IndexStore.open(work / "idx", IDENTITY, create=True) as store:
        store.compact()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Step:
    name: str
    prepare: Callable[[Path], None] | None
    run: Callable[[Path], None]


STEPS = [
    Step("index", prepare_index, run_index),
    Step("update", prepare_update, run_update),
    Step("merge", None, run_merge),
    Step("remerge", prepare_remerge, run_merge),
]
# The catalogue-scale work's steps, with their own points (``remove.*``, ``compact.*``).
if hasattr(IndexStore, "remove"):
    STEPS.append(Step("remove", None, run_remove))
if hasattr(IndexStore, "compact"):
    STEPS.append(Step("compact", None, run_compact))


def state(work: Path) -> dict[str, dict[str, object]]:
    """Everything a user can observe of each store, vectors as float16 bytes."""
    out: dict[str, dict[str, object]] = {}
    for name in STORES:
        if not (work / name / "catalog.sqlite").exists():
            continue
        with IndexStore.open(work / name, None, create=False) as store:
            out[name] = {
                "tracks": sorted(
                    (t.path, t.content_hash, t.n_samples, t.sample_rate, t.n_windows)
                    for t in store.tracks()
                ),
                "windows": {
                    (t.path, int(s)): v.tobytes()
                    for t, starts, vectors in store.iter_windows()
                    for s, v in zip(starts, vectors, strict=True)
                },
                "duplicates": store.duplicates(),
                "failures": store.failures(),
            }
    return out


def differences(got: dict, want: dict) -> tuple[int, int, int]:
    """(tracks lost, tracks duplicated, vectors differing) of ``got`` against ``want``."""
    lost = duplicated = differing = 0
    for name in set(got) | set(want):
        g, w = got.get(name, {}), want.get(name, {})
        g_paths = collections.Counter(t[0] for t in g.get("tracks", []))
        w_paths = collections.Counter(t[0] for t in w.get("tracks", []))
        lost += sum((w_paths - g_paths).values())
        g_hash = collections.Counter(t[1] for t in g.get("tracks", []))
        w_hash = collections.Counter(t[1] for t in w.get("tracks", []))
        duplicated += sum((g_hash - w_hash).values())
        gw, ww = g.get("windows", {}), w.get("windows", {})
        differing += sum(1 for k in set(gw) | set(ww) if gw.get(k) != ww.get(k))
    return lost, duplicated, differing


def assert_sound(work: Path, *, check_index: bool) -> None:
    for name in STORES:
        if (work / name / "catalog.sqlite").exists():
            report = verify_store(work / name, check_index=check_index and name != "shard")
            assert report.ok, f"{name}: {report.problems}"


@dataclass
class Reference:
    work: Path
    before: list[Path]  # a copy of the work folder before each step
    after: list[dict]
    hits: list[collections.Counter[str]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    # In memory where the machine has it: SIGKILL and exceptions cannot observe fsync (the
    # page cache survives a killed process), and a disk's fsync latency would dominate.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        base = Path(tempfile.mkdtemp(prefix="mert-faults-", dir=shm))
    else:
        base = tmp_path_factory.mktemp("faults")
    try:
        yield _reference(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _reference(base: Path) -> Reference:
    work = base / "work"
    work.mkdir()
    ref = Reference(work, [], [], [])
    for i, step in enumerate(STEPS):
        if step.prepare is not None:
            step.prepare(work)
        snapshot = base / f"before_{i}"
        shutil.copytree(work, snapshot, symlinks=True)
        ref.before.append(snapshot)
        with faults.record() as hits:
            step.run(work)
        ref.hits.append(hits)
        ref.after.append(state(work))
        assert_sound(work, check_index=True)
    return ref


def restore(ref: Reference, step: int) -> None:
    shutil.rmtree(ref.work)
    shutil.copytree(ref.before[step], ref.work, symlinks=True)


def sites(ref: Reference, every_hit: bool) -> list[tuple[int, str, int]]:
    out = []
    for i, hits in enumerate(ref.hits):
        for name, count in sorted(hits.items()):
            nths = range(1, count + 1) if every_hit else sorted({1, count})
            out += [(i, name, n) for n in nths]
    return out


def _child(i: int, work: str, name: str, nth: int) -> None:
    """In a child process: run step ``i`` with SIGKILL armed at ``name``'s ``nth`` hit."""
    with faults.inject(name, nth, "kill"):
        STEPS[i].run(Path(work))


_forkserver: multiprocessing.context.ForkServerContext | None = None


def kill_at(i: int, work: Path, name: str, nth: int) -> int:
    """Exit code of step ``i`` run in a child process killed at ``name:nth`` (-9 if reached).

    Children fork from a server that has imported this module once (fast, and no
    threads of the test process are inherited); ``faults.ENV`` does the same for a
    program started anew (the end-to-end test).
    """
    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(["tests.test_faults"])
    child = _forkserver.Process(target=_child, args=(i, str(work), name, nth))
    child.start()
    child.join(120)
    assert child.exitcode is not None, f"{name}:{nth}: child hung"
    return child.exitcode


def inject(ref: Reference, i: int, name: str, nth: int, action: str) -> tuple[int, int, int]:
    """Run step ``i`` from its starting state with one fault; check; rerun; compare."""
    restore(ref, i)
    if action == "kill":
        code = kill_at(i, ref.work, name, nth)
        assert code == -signal.SIGKILL, f"{name}:{nth} not reached (exit code {code})"
    else:
        with faults.inject(name, nth, action) as armed:
            try:
                STEPS[i].run(ref.work)
            except (KeyboardInterrupt, faults.InjectedFault, IndexerError):
                pass
        assert armed.fired, f"{name}:{nth} not reached"
    assert_sound(ref.work, check_index=False)  # readable as the fault left it
    STEPS[i].run(ref.work)  # the rerun
    got = state(ref.work)
    assert_sound(ref.work, check_index=True)
    diffs = differences(got, ref.after[i])
    assert got == ref.after[i], f"{STEPS[i].name} {name}:{nth} {action}: {diffs}"
    return diffs


def fault_table(ref: Reference, every_hit: bool, actions: tuple[str, ...]) -> list[str]:
    rows = collections.defaultdict(lambda: [0, 0, 0, 0])
    for i, name, nth in sites(ref, every_hit):
        for action in actions:
            diffs = inject(ref, i, name, nth, action)
            row = rows[(name, action)]
            row[0] += 1
            for k in range(3):
                row[k + 1] += diffs[k]
    lines = ["| step | fault | sites | tracks lost | tracks duplicated | vectors differing |"]
    lines += [
        f"| {name} | {action} | {n} | {lost} | {dup} | {diff} |"
        for (name, action), (n, lost, dup, diff) in sorted(rows.items())
    ]
    table = os.environ.get("MERT_INDEXER_FAULT_TABLE")
    if table:
        Path(table).write_text("\n".join(lines) + "\n")
    return lines


def test_every_declared_point_is_reached_by_the_scenario(reference: Reference) -> None:
    declared = faults.declared_points()
    reached = set().union(*reference.hits)
    assert {"segment.write", "catalog.committed", "generation.current", "merge.copy"} <= declared
    assert declared - RECOVERY_POINTS <= reached, (
        f"no step of STEPS reaches {sorted(declared - RECOVERY_POINTS - reached)}: extend it"
    )


@pytest.mark.parametrize("action", ["interrupt", "error"])
def test_interrupt_or_error_at_every_step(reference: Reference, action: str) -> None:
    fault_table(reference, every_hit=False, actions=(action,))


def test_sigkill_at_every_step(reference: Reference) -> None:
    fault_table(reference, every_hit=False, actions=("kill",))


@pytest.mark.slow
def test_every_fault_at_every_hit(reference: Reference) -> None:
    fault_table(reference, every_hit=True, actions=("kill", "interrupt", "error"))


def test_crash_while_recovering_from_a_crash(reference: Reference) -> None:
    """The recovery's own write (cutting an unrecorded tail) killed, then a clean rerun."""
    restore(reference, 0)
    for name, nth in (("segment.fsync", 2), ("segment.truncate", 1)):
        assert kill_at(0, reference.work, name, nth) == -signal.SIGKILL, name
        assert_sound(reference.work, check_index=False)
    STEPS[0].run(reference.work)
    assert state(reference.work) == reference.after[0]
    assert_sound(reference.work, check_index=True)


def _vectors(index: Path) -> dict[tuple[str, int], bytes]:
    with IndexStore.open(index, None, create=False) as store:
        return {
            (t.path, int(s)): v.tobytes()
            for t, starts, vectors in store.iter_windows()
            for s, v in zip(starts, vectors, strict=True)
        }


# One request of one window at a time: the same batches in every run, so the same bytes.
E2E = ("--no-progress", "--batch-size", "1", "--in-flight", "1", "--commit-seconds", "0")


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        pytest.param("catalog.committed:3:kill", -signal.SIGKILL, marks=pytest.mark.slow),
        ("catalog.committed:3:interrupt", 130),  # item 1 through the CLI: Ctrl-C after COMMIT
    ],
)
def test_indexer_client_fault_then_rerun_is_exact(triton, catalogue, tmp_path, spec, code):
    """End to end through indexer-client and the bundled Triton: a crash (or Ctrl-C) right
    after a commit, a rerun, and the store equals a clean run's, vector bytes included."""
    folder = catalogue[0].parent
    args = ("--server", triton.grpc_url, "--input", str(folder), *E2E)
    ref = run_cli("indexer-client", *args, "--index", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    faulted = run_cli(
        "indexer-client", *args, "--index", str(tmp_path / "idx"), env={faults.ENV: spec}
    )
    assert faulted.returncode == code, faulted.stderr
    ok = run_cli("indexer-admin", "verify", "--index", str(tmp_path / "idx"), "--no-index")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rerun = run_cli("indexer-client", *args, "--index", str(tmp_path / "idx"))
    assert rerun.returncode == 0, rerun.stderr
    assert _vectors(tmp_path / "idx") == _vectors(tmp_path / "ref")
    ok = run_cli("indexer-admin", "verify", "--index", str(tmp_path / "idx"))
    assert ok.returncode == 0 and "sound" in ok.stdout, ok.stdout + ok.stderr
