"""Deterministic synthetic repositories (small, medium, large, history), generated once and
cached.

``history`` is history-heavy: tens of thousands of commits over a few thousand files, each
commit changing a few lines of one or two files, streamed into ``git fast-import`` (a minute,
not hours), then repacked with a bitmap index as a real server holds it.

A repository is generated from a fixed seed into a bare repository under ``bench/.cache/repos``
with fixed author/committer dates, so its commit ids are the same on every machine. A stamp
file records the spec it was made from; a changed spec regenerates it.

Per-run commits (the pushes that become events) are made with git plumbing on a scratch bare
clone: no working tree, so a 1 GiB repository costs nothing to commit to.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATOR_VERSION = 2
MiB = 1024 * 1024

_ENV_BASE = {
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}


@dataclass(frozen=True)
class RepoSpec:
    """What a synthetic repository holds at its tip, and how much history led there."""

    name: str
    files: int  # text files at the tip
    text_bytes: int  # their total size, about
    commits: int  # history on main
    binaries: int = 0  # random (incompressible) binary files
    binary_bytes: int = 0  # size of each
    seed: int = 20261126
    history: bool = False  # generated with fast-import: small changes, many commits


SPECS: dict[str, RepoSpec] = {
    "tiny": RepoSpec("bench-tiny", files=20, text_bytes=64 * 1024, commits=2),
    "small": RepoSpec("bench-small", files=200, text_bytes=2 * MiB, commits=3),
    "medium": RepoSpec("bench-medium", files=5000, text_bytes=100 * MiB, commits=20),
    "large": RepoSpec(
        "bench-large",
        files=2000,
        text_bytes=24 * MiB,
        commits=4,
        binaries=8,
        binary_bytes=125 * MiB,
    ),
    "history": RepoSpec(
        "bench-history", files=2500, text_bytes=10 * MiB, commits=25_000, history=True
    ),
    "history-tiny": RepoSpec(
        "bench-history-tiny", files=40, text_bytes=128 * 1024, commits=300, history=True
    ),
}


def git_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.devnull} | _ENV_BASE | extra


def git(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> str:
    """Run git; return stdout stripped. Raises RuntimeError with git's stderr on failure."""
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=env or git_env(),
        input=stdin,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args[:3])} failed: {result.stderr.decode()[-2000:]}")
    return result.stdout.decode().strip()


class _Text:
    """Source-like text from a fixed vocabulary: compresses about as well as real code."""

    def __init__(self, rng: random.Random) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz_"
        self.rng = rng
        self.words = ["def", "return", "if", "self", "=", "(", ")", ":", "None", "in", "for"] + [
            "".join(rng.choices(letters, k=rng.randint(2, 12))) for _ in range(4000)
        ]
        # Zipf-distributed words: about 30 % after deflate, close to real source code.
        self.weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(self.words))))

    def make(self, size: int) -> bytes:
        rng, words = self.rng, self.words
        lines: list[str] = []
        total = 0
        while total < size:
            indent = "    " * rng.randint(0, 3)
            line = indent + " ".join(
                rng.choices(words, cum_weights=self.weights, k=rng.randint(3, 12))
            )
            lines.append(line)
            total += len(line) + 1
        return ("\n".join(lines) + "\n").encode()


def _tree_paths(spec: RepoSpec) -> list[str]:
    per_dir = 40
    return [
        f"src/pkg{i // (per_dir * per_dir):02d}/mod{(i // per_dir) % per_dir:02d}/file{i:05d}.py"
        for i in range(spec.files)
    ]


def generate(spec: RepoSpec, dest: Path) -> str:
    """Generate ``spec`` into bare repository ``dest``; return the tip of main."""
    if spec.history:
        return _generate_history(spec, dest)
    rng = random.Random(f"{spec.seed}:{spec.name}")
    text = _Text(rng)
    mean = spec.text_bytes // max(1, spec.files)
    paths = _tree_paths(spec)
    git("init", "--bare", "--quiet", "--initial-branch=main", str(dest))
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="gen-") as scratch:
        work = Path(scratch)
        env = git_env(GIT_DIR=str(dest), GIT_WORK_TREE=str(work))
        for commit in range(spec.commits):
            if commit == 0:
                changed = paths
                for n in range(spec.binaries):
                    target = work / "assets" / f"blob{n:02d}.bin"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(rng.randbytes(spec.binary_bytes))
                (work / "buildspec.yml").write_text(
                    "version: 0.2\nphases:\n  build:\n    commands:\n      - echo $COMMIT_ID\n"
                )
            else:  # each later commit rewrites about 2 % of the files
                changed = rng.sample(paths, max(1, len(paths) // 50))
            for path in changed:
                target = work / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(text.make(int(mean * rng.uniform(0.2, 1.8))))
            date = f"2026-01-01T00:{commit:02d}:00Z"
            dated = env | {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
            git("add", "--all", env=dated)
            git("-c", "gc.auto=0", "commit", "--quiet", "-m", f"history {commit}", env=dated)
    # One pack, as a real server holds it; big random blobs are not worth a delta search.
    git("-c", "core.bigFileThreshold=16m", "repack", "-a", "-d", "-q", cwd=dest)
    git("prune-packed", cwd=dest)
    for leftover in ("index", "COMMIT_EDITMSG"):
        (dest / leftover).unlink(missing_ok=True)
    return git("rev-parse", "refs/heads/main", cwd=dest)


def _generate_history(spec: RepoSpec, dest: Path) -> str:
    """The first commit adds every file; each later one rewrites 1-3 lines of 1-2 files."""
    rng = random.Random(f"{spec.seed}:{spec.name}")
    text = _Text(rng)
    mean = spec.text_bytes // max(1, spec.files)
    paths = _tree_paths(spec)
    git("init", "--bare", "--quiet", "--initial-branch=main", str(dest))
    importer = subprocess.Popen(
        ["git", "fast-import", "--quiet", "--done"],
        cwd=dest,
        env=git_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert importer.stdin is not None
    out = importer.stdin
    files: dict[str, list[bytes]] = {}

    def data(body: bytes) -> None:
        out.write(b"data %d\n%s\n" % (len(body), body))

    start = 1767225600  # 2026-01-01T00:00:00Z, a commit a minute
    for n in range(spec.commits):
        out.write(b"commit refs/heads/main\n")
        out.write(b"committer Bench <bench@example.com> %d +0000\n" % (start + 60 * n))
        data(b"history %d" % n)
        if n == 0:
            changed = paths
            buildspec = b"version: 0.2\nphases:\n  build:\n    commands:\n      - echo $COMMIT_ID\n"
            out.write(b"M 100644 inline buildspec.yml\n")
            data(buildspec)
            for path in paths:
                files[path] = text.make(int(mean * rng.uniform(0.2, 1.8))).split(b"\n")
        else:
            changed = rng.sample(paths, rng.randint(1, 2))
            for path in changed:
                lines = files[path]
                for _ in range(rng.randint(1, 3)):
                    lines[rng.randrange(len(lines))] = text.make(40).split(b"\n")[0]
        for path in changed:
            out.write(b"M 100644 inline %s\n" % path.encode())
            data(b"\n".join(files[path]))
        out.write(b"\n")
    out.write(b"done\n")
    out.close()
    if importer.wait() != 0:
        raise RuntimeError("git fast-import failed")
    # One pack with a bitmap index, as a hosting service keeps it (full clones count objects
    # from the bitmap); fast-import's deltas are reused, so this takes seconds.
    git("repack", "-a", "-d", "-q", "--write-bitmap-index", cwd=dest)
    git("prune-packed", cwd=dest)
    return git("rev-parse", "refs/heads/main", cwd=dest)


def cached(spec: RepoSpec, cache: Path) -> tuple[Path, str]:
    """The bare repository for ``spec`` under ``cache`` (generated if missing); and its tip."""
    dest = cache / "repos" / f"{spec.name}.git"
    stamp = cache / "repos" / f"{spec.name}.json"
    want = asdict(spec) | {"version": GENERATOR_VERSION}
    if stamp.is_file() and dest.is_dir():
        saved = json.loads(stamp.read_text())
        if {k: v for k, v in saved.items() if k != "head"} == want:
            return dest, str(saved["head"])
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    head = generate(spec, dest)
    stamp.write_text(json.dumps(want | {"head": head}, indent=1))
    return dest, head


def tree_bytes(git_dir: Path, commit: str) -> tuple[int, int]:
    """(number of files, total bytes) of ``commit``'s tree."""
    listing = git("ls-tree", "-r", "-l", commit, cwd=git_dir)
    sizes = [int(line.split()[3]) for line in listing.splitlines() if line.split()[3] != "-"]
    return len(sizes), sum(sizes)


class Pusher:
    """Makes new commits on branches with plumbing (no working tree) and pushes them."""

    def __init__(self, source: Path, scratch: Path, url: str, ssh_command: str) -> None:
        self.dir = scratch
        git("clone", "--bare", "--quiet", str(source), str(scratch))
        self.env = git_env(GIT_SSH_COMMAND=ssh_command, GIT_INDEX_FILE=str(scratch / "bench.index"))
        self.url = url
        self.tips: dict[str, str] = {}
        self.rng = random.Random(7)
        self.text = _Text(self.rng)
        self.base = git("rev-parse", "refs/heads/main", cwd=scratch)

    def commit(self, branch: str, label: str) -> str:
        """A new commit on ``branch`` (from main's tip at first) that changes one file."""
        parent = self.tips.get(branch, self.base)
        env = self.env
        git("read-tree", parent, cwd=self.dir, env=env)
        blob = git(
            "hash-object",
            "-w",
            "--stdin",
            cwd=self.dir,
            env=env,
            stdin=f"# {label}\n".encode() + self.text.make(2048),
        )
        slug = branch.replace("/", "-")
        git(
            "update-index",
            "--add",
            "--cacheinfo",
            f"100644,{blob},changes/{slug}.py",
            cwd=self.dir,
            env=env,
        )
        tree = git("write-tree", cwd=self.dir, env=env)
        commit = git("commit-tree", tree, "-p", parent, "-m", label, cwd=self.dir, env=env)
        self.tips[branch] = commit
        return commit

    def push(self, branches: list[str]) -> None:
        """One ``git push`` that moves every branch in ``branches`` to its new tip."""
        refspecs = [f"{self.tips[b]}:refs/heads/{b}" for b in branches]
        git("push", "--quiet", "--force", self.url, *refspecs, cwd=self.dir, env=self.env)
