"""The archive is what a real `git clone` + `git checkout <commit>` leaves, file by file:
.gitattributes as a checkout applies them, no filter ever run, and the opt-in .git."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from service.errors import ConfigurationError
from service.events import codecommit_event
from service.git import Extras, Git
from service.job import extras
from service.pipelines import parse_config
from service.settings import load_settings
from tests.helpers import (
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    push_for,
    wait_for,
)
from tests.test_git import make_settings
from tests.trees import (
    archive_bytes,
    checkout,
    differences,
    tree_of_checkout,
    tree_of_zip,
    unpack,
)


async def archive_and_checkout(
    world: GitWorld, tmp_path: Path, repo: WorkCopy, commit: str, name: str = "checkout"
) -> tuple[bytes, Path]:
    git = Git(make_settings(world, tmp_path))
    fetched = await git.fetch(push_for(repo.repository, "main", commit))
    data = await archive_bytes(git, fetched)
    cloned = await checkout(world, repo.repository, commit, tmp_path / name)
    assert differences(tree_of_zip(data), tree_of_checkout(cloned)) == []
    return data, cloned


async def test_export_ignore_and_export_subst_never_apply(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "slim")
    commit = await repo.commit(
        {
            ".gitattributes": "tests/ export-ignore\n.github export-ignore\n"
            "version.py export-subst\n",
            "tests/test_lib.py": "def test(): pass\n",
            ".github/workflows/ci.yml": "on: push\n",
            "version.py": "COMMIT = '$Format:%H$'\n",
            "lib.py": "x = 1\n",
        }
    )
    await repo.push("main")
    data, _ = await archive_and_checkout(git_world, tmp_path, repo, commit)
    tree = tree_of_zip(data)
    assert tree["tests/test_lib.py"] == ("file", False, b"def test(): pass\n")
    assert tree[".github/workflows/ci.yml"] == ("file", False, b"on: push\n")
    assert tree["version.py"] == ("file", False, b"COMMIT = '$Format:%H$'\n")


async def test_line_endings_and_ident_convert_as_a_checkout_does(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "eol")
    commit = await repo.commit(
        {
            ".gitattributes": "*.bat text eol=crlf\n*.sh text eol=lf\n*.bin binary\n"
            "auto.txt text=auto\nid.c ident\n",
            "run.bat": "echo one\necho two\n",
            "run.sh": "echo one\r\necho two\r\n",  # committed as is: `text` normalises on add
            "data.bin": b"\x00\r\n\n",
            "auto.txt": "a\r\nb\r\n",
            "id.c": "/* $Id$ */\n",
            "plain.txt": "keep\r\nme\n",
        }
    )
    await repo.push("main")
    data, _ = await archive_and_checkout(git_world, tmp_path, repo, commit)
    tree = tree_of_zip(data)
    assert tree["run.bat"] == ("file", False, b"echo one\r\necho two\r\n")
    assert tree["data.bin"] == ("file", False, b"\x00\r\n\n")
    blob = await repo.git("rev-parse", f"{commit}:id.c")
    assert tree["id.c"] == ("file", False, f"/* $Id: {blob} $ */\n".encode())


async def test_every_kind_of_attribute_applies_as_in_a_checkout(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """export-ignore and export-subst never apply, wherever they are set (a nested
    .gitattributes, through a macro); crlf, -crlf, eol alone, text=auto with eol, ident over
    an expanded $Id$ and working-tree-encoding apply as a checkout applies them."""
    repo = await WorkCopy.create(git_world, tmp_path, "kinds")
    commit = await repo.commit(
        {
            ".gitattributes": "[attr]slim export-ignore export-subst\n[attr]win text eol=crlf\n"
            "docs/ slim\n*.w win\n*.enc text working-tree-encoding=UTF-16LE\n*.cr crlf\n"
            "*.nocr -crlf\n*.e eol=crlf\nid.c ident\n*.auto text=auto eol=crlf\n",
            "docs/a.md": "$Format:%H$\n",
            "sub/.gitattributes": "x.txt export-subst\nignored/ export-ignore\n*.w -text\n",
            "sub/x.txt": "$Format:%H$ $Format:%an$\n",
            "sub/ignored/f": "f\n",
            "sub/y.w": "a\nb\n",
            "a.w": "a\nb\n",
            "u.enc": "h\u00e9llo\nworld\n".encode("utf-16-le"),
            "c.cr": "x\ny\n",
            "c.nocr": "x\r\ny\n",
            "d.e": "x\ny\n",
            "id.c": "$Id: stale $\n$Id$\n",
            "m.auto": "a\r\nb\n",
            "n.auto": "a\nb\n",
        }
    )
    await repo.push("main")
    data, _ = await archive_and_checkout(git_world, tmp_path, repo, commit)
    tree = tree_of_zip(data)
    assert tree["docs/a.md"] == ("file", False, b"$Format:%H$\n")
    assert tree["sub/x.txt"] == ("file", False, b"$Format:%H$ $Format:%an$\n")
    assert tree["sub/ignored/f"] == ("file", False, b"f\n")
    assert tree["a.w"] == ("file", False, b"a\r\nb\r\n")  # the macro applied
    assert tree["sub/y.w"] == ("file", False, b"a\nb\n")
    assert tree["u.enc"] == ("file", False, "h\u00e9llo\nworld\n".encode("utf-16-le"))
    assert tree["d.e"] == ("file", False, b"x\r\ny\r\n")


async def test_a_filter_driver_named_by_the_repository_never_runs(
    git_world: GitWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository names drivers; only configuration defines their commands. Even with a
    global and a system config defining them in the service's environment, none runs."""
    marker = tmp_path / "filter-ran"
    script = tmp_path / "evil-filter"
    script.write_text(f"#!/bin/sh\necho ran >> '{marker}'\ncat\n")
    script.chmod(0o755)
    evil = str(script)
    config = tmp_path / "hostile.gitconfig"
    config.write_text(
        f'[filter "evil"]\n\tsmudge = {evil}\n\tclean = cat\n'
        f'[filter "lfs"]\n\tsmudge = {evil}\n\tclean = cat\n'
    )
    home = tmp_path / "hostile-home"
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".gitconfig").write_text(config.read_text())
    for name, value in {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_GLOBAL": str(config),
        "GIT_CONFIG_SYSTEM": str(config),
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "filter.evil.smudge",
        "GIT_CONFIG_VALUE_0": evil,
    }.items():
        monkeypatch.setenv(name, value)
    repo = await WorkCopy.create(git_world, tmp_path, "evil")
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'a' * 64}\nsize 9\n"
    commit = await repo.commit(
        {
            ".gitattributes": "*.txt filter=evil\n*.bin filter=lfs diff=lfs merge=lfs -text\n",
            "a.txt": "content\n",
            "model.bin": pointer,
        }
    )
    await repo.push("main")
    assert not marker.exists()

    git = Git(make_settings(git_world, tmp_path))
    data = await archive_bytes(git, await git.fetch(push_for("evil", "main", commit)))
    assert not marker.exists()
    tree = tree_of_zip(data)
    assert tree["a.txt"] == ("file", False, b"content\n")
    assert tree["model.bin"] == ("file", False, pointer.encode())  # the LFS pointer as committed

    # Control: a checkout that reads that configuration does run the driver.
    hostile = git_world.env() | {"GIT_CONFIG_GLOBAL": str(config)}
    await checkout(git_world, "evil", commit, tmp_path / "control", env=hostile)
    assert marker.exists()


# -- the property: any tree --------------------------------------------------------------------

_names = st.sampled_from(
    ["a", "b.txt", "c.bat", "d.sh", "e.bin", "f.md", "sp ace", "ü.txt", "-dash", "x=y", "t\tab"]
)
_dirs = st.sampled_from(["", "src/", "tests/", "deep/er/", ".github/"])
_bodies = st.sampled_from(
    [b"", b"one\n", b"one\r\ntwo\r\n", b"mixed\r\nend\n", b"\x00\xff\r\n", b"$Format:%H$\n"]
    + [b"$Id$\n", b"no newline"]
)
_attribute_lines = st.sampled_from(
    [
        "tests/ export-ignore",
        ".github export-ignore",
        "* export-subst",
        "*.txt text",
        "*.bat text eol=crlf",
        "*.sh eol=lf",
        "*.bin binary",
        "* text=auto",
        "*.md -text",
        "*.txt ident",
        "src/** export-ignore",
        "* filter=evil",
        "[attr]win text eol=crlf\n*.bat win",
        "*.bat win",
    ]
)


Files = dict[str, tuple[bytes, bool]]
Drawn = tuple[Files, dict[str, str], str]


@st.composite
def trees(draw: st.DrawFn) -> Drawn:
    files = draw(
        st.dictionaries(
            st.tuples(_dirs, _names).map("".join), st.tuples(_bodies, st.booleans()), max_size=8
        )
    )
    links = draw(
        st.dictionaries(
            st.sampled_from(["link", "src/up", "deep/abs"]),
            st.sampled_from(["a", "../b.txt", "/etc/passwd", "missing"]),
            max_size=2,
        )
    )
    links = {
        k: v
        for k, v in links.items()
        if k not in files and not any(f.startswith(k + "/") for f in files)
    }
    attributes = "\n".join(draw(st.lists(_attribute_lines, max_size=5, unique=True)))
    return files, links, attributes


async def commit_tree(repo: WorkCopy, drawn: Drawn) -> None:
    """Stage a drawn tree exactly: core.autocrlf off, so the blobs hold the bytes drawn
    (attributes are for the checkout to apply, not for this commit)."""
    files, links, attributes = drawn
    for path, (body, executable) in files.items():
        target = repo.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        target.chmod(0o755 if executable else 0o644)
    for path, target_name in links.items():
        link = repo.path / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target_name)
    (repo.path / ".gitattributes").write_text(attributes + "\n")
    await repo.git("-c", "core.autocrlf=false", "add", "--all")


_counter = itertools.count()


class World:
    """The git world under a short name: hypothesis prints a failing example's arguments, and
    the world's repr (every ref change of every example) would drown it."""

    def __init__(self, world: GitWorld) -> None:
        self.world = world

    def __repr__(self) -> str:
        return "git_world"


@pytest.fixture
def world(git_world: GitWorld) -> World:
    return World(git_world)


# No shrinking: each example pushes to and clones from the SSH git host, so shrinking a
# failure would take minutes; the examples are small enough to read as they are.
@settings(
    max_examples=15,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(trees(), st.one_of(st.none(), st.tuples(st.sampled_from(["mod", "deep/mod"]), trees())))
async def test_any_tree_archives_as_its_checkout(
    world: World,
    tmp_path: Path,
    tree: Drawn,
    submodule: tuple[str, Drawn] | None,
) -> None:
    """Any tree (attributes and macros, symlinks, executable bits, odd names, a submodule with
    its own attributes, an empty directory) archives as `git clone` + checkout +
    `submodule update` leaves it."""
    git_world = world.world
    n = next(_counter)
    repo = await WorkCopy.create(git_world, tmp_path, f"prop{n}")
    await commit_tree(repo, tree)
    if submodule is not None:
        path, sub_tree = submodule
        sub = await WorkCopy.create(git_world, tmp_path, f"propsub{n}")
        await commit_tree(sub, sub_tree)
        await sub.git("commit", "--quiet", "--allow-empty", "-m", "sub")
        await sub.push("main")
        sub_commit = await sub.git("rev-parse", "HEAD")
        # And an empty directory: a submodule `git submodule update` leaves alone.
        (repo.path / ".gitmodules").write_text(
            f'[submodule "m"]\n\tpath = {path}\n\turl = ../propsub{n}\n'
            f'[submodule "e"]\n\tpath = empty\n\turl = ../propsub{n}\n\tupdate = none\n'
        )
        await repo.git("add", ".gitmodules")
        for at in (path, "empty"):
            await repo.git("update-index", "--add", "--cacheinfo", f"160000,{sub_commit},{at}")
    await repo.git("commit", "--quiet", "--allow-empty", "-m", "tree")
    commit = await repo.git("rev-parse", "HEAD")
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path, cache_dir=tmp_path / f"cache{n}"))
    fetched = await git.fetch(push_for(repo.repository, "main", commit))
    data = await archive_bytes(git, fetched, Extras(submodules=True))
    cloned = await checkout(
        git_world, repo.repository, commit, tmp_path / f"checkout{n}", submodules=True
    )
    assert differences(tree_of_zip(data), tree_of_checkout(cloned)) == []


# -- git_metadata: a working checkout ------------------------------------------------------------


async def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    clean = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd.parent),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    result = await anyio.run_process(list(args), cwd=cwd, env=clean | (env or {}), check=False)
    assert result.returncode == 0, f"{args}: {result.stderr.decode()}"
    return result.stdout.decode().strip()


async def test_git_metadata_makes_the_build_directory_a_clean_checkout_of_the_branch(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "meta")
    for n in range(3):
        await repo.commit({"v.txt": f"{n}\n"})
    (repo.path / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (repo.path / "run.sh").chmod(0o755)
    (repo.path / "link").symlink_to("v.txt")
    commit = await repo.commit(
        {
            ".gitattributes": "*.bat text eol=crlf\n",
            "win.bat": "echo\n",
            "pyproject.toml": '[project]\nname = "meta"\ndynamic = ["version"]\n'
            '[build-system]\nrequires = ["setuptools-scm"]\n[tool.setuptools_scm]\n',
        },
        message="the pushed commit",
    )
    await repo.checkout("feature/x")
    await repo.push("feature/x")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("meta", "feature/x", commit))
    plain = await archive_bytes(git, fetched)
    data = await archive_bytes(git, fetched, Extras(git_metadata_ref="refs/heads/feature/x"))
    build = tmp_path / "build"
    unpack(data, build)

    # Without the .git, the same files as the checkout.
    cloned = await checkout(git_world, "meta", commit, tmp_path / "checkout")
    inside = {
        k: v for k, v in tree_of_zip(data).items() if k != ".git" and not k.startswith(".git/")
    }
    assert differences(inside, tree_of_checkout(cloned)) == []
    assert differences(tree_of_zip(plain), tree_of_checkout(cloned)) == []

    assert await run(build, "git", "rev-parse", "HEAD") == commit
    assert await run(build, "git", "symbolic-ref", "--short", "HEAD") == "feature/x"
    assert await run(build, "git", "log", "-1", "--format=%H %s") == f"{commit} the pushed commit"
    assert await run(build, "git", "describe", "--always") == commit[:7]
    assert await run(build, "git", "rev-parse", "--is-shallow-repository") == "true"
    assert await run(build, "git", "status", "--porcelain", "--untracked-files=all") == ""
    # setuptools-scm finds a version from it (no tag: 0.1.dev1+g<commit>).
    version = await run(build, sys.executable, "-m", "setuptools_scm")
    assert f"g{commit[:7]}" in version, version


async def test_git_metadata_of_branches_with_odd_names(git_world: GitWorld, tmp_path: Path) -> None:
    """Any branch name git accepts becomes the checked-out branch, as it is: never parsed by
    a shell, never an option."""
    repo = await WorkCopy.create(git_world, tmp_path, "odd")
    commit = await repo.commit({"a.txt": "a\n", ".gitattributes": "*.txt text eol=crlf ident\n"})
    git = Git(make_settings(git_world, tmp_path))
    for n, branch in enumerate(
        ["HEAD", "-dash", "f\u00e9/$(touch${IFS}pwned)", "a'b\"c", "@", "a;b|c&`id`"]
    ):
        await repo.push(f"main:refs/heads/{branch}")
        fetched = await git.fetch(push_for("odd", branch, commit))
        data = await archive_bytes(git, fetched, Extras(git_metadata_ref=f"refs/heads/{branch}"))
        build = tmp_path / f"build{n}"
        unpack(data, build)
        assert await run(build, "git", "symbolic-ref", "HEAD") == f"refs/heads/{branch}"
        assert await run(build, "git", "rev-parse", "HEAD") == commit
        assert await run(build, "git", "status", "--porcelain", "--untracked-files=all") == ""
    assert not [p async for p in anyio.Path(tmp_path).rglob("pwned")]


async def test_git_metadata_of_a_tag_is_a_detached_head_with_the_tag(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "tagged")
    commit = await repo.commit({"a.txt": "a\n"})
    await repo.push("main", "main:refs/tags/v1.2.3")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("tagged", "main", commit))
    data = await archive_bytes(git, fetched, Extras(git_metadata_ref="refs/tags/v1.2.3"))
    build = tmp_path / "build"
    unpack(data, build)
    assert await run(build, "git", "rev-parse", "HEAD") == commit
    assert await run(build, "git", "describe", "--tags") == "v1.2.3"
    assert await run(build, "git", "status", "--porcelain") == ""


# -- the rule fields ---------------------------------------------------------------------------


def test_rule_fields_choose_the_extras(tmp_path: Path) -> None:
    settings = load_settings(queue_url="q", work_queue_url="w", bucket="bucket", submodules=True)
    config = parse_config(
        "version: 1\nrules:\n"
        "  - repository: meta\n    git_metadata: true\n    submodules: false\n"
        "  - repository: '*'\n",
        "pipelines.yaml",
        settings,
    )
    push = push_for("meta", "feature/x")
    assert extras(config.rule_for("meta"), push) == Extras(
        git_metadata_ref="refs/heads/feature/x", submodules=False
    )
    assert extras(config.rule_for("other"), push) == Extras(submodules=True)  # the setting
    with pytest.raises(ConfigurationError, match="git_metadata"):
        parse_config(
            "version: 1\nrules:\n  - repository: x\n    git_metadata: maybe\n", "p.yaml", settings
        )


# -- through the service -----------------------------------------------------------------------


@pytest.mark.e2e
async def test_the_rule_fields_reach_the_uploaded_archive(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    """The service as a real process: a rule with submodules and git_metadata uploads a zip
    that unpacks into a clean checkout of the branch with its submodule."""
    await create_project(aws, "app")
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit({"lib.txt": "lib\n"})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    await app.commit(
        {"app.txt": "app\n", ".gitmodules": '[submodule "lib"]\n\tpath = lib\n\turl = ../lib\n'}
    )
    await app.git("update-index", "--add", "--cacheinfo", f"160000,{lib_commit},lib")
    await app.git("commit", "--quiet", "-m", "the submodule")
    commit = await app.git("rev-parse", "HEAD")
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        "version: 1\nrules:\n  - repository: app\n    submodules: true\n    git_metadata: true\n"
    )
    service = await start_service(BRANCHBUILD_CONFIG=str(config))
    await app.push("main:feature/x")
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def built() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="built") == 1

    await wait_for(built, within=60, what="the build")
    [request] = await aws.start_builds()
    key = request["sourceLocationOverride"].removeprefix(f"{aws.bucket}/")
    build = tmp_path / "build"
    unpack(await aws.object(key), build)
    assert (build / "lib" / "lib.txt").read_text() == "lib\n"
    assert await run(build, "git", "rev-parse", "HEAD") == commit
    assert await run(build, "git", "symbolic-ref", "--short", "HEAD") == "feature/x"
    assert await run(build, "git", "status", "--porcelain") == ""
