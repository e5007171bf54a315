"""Submodules over the real SSH git host: checked out at their gitlinks' exact commits as a
`git clone` + `git submodule update --init --recursive` leaves them, or a clear error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from service.errors import (
    ArchiveTooLarge,
    ConfigurationError,
    GitError,
    PermanentError,
    SubmoduleError,
)
from service.git import Extras, Git
from service.settings import load_settings
from service.submodules import resolve_url
from tests.helpers import GitWorld, WorkCopy, push_for
from tests.test_git import make_settings
from tests.trees import archive_bytes, checkout, differences, tree_of_checkout, tree_of_zip

WITH_SUBMODULES = Extras(submodules=True)


async def with_gitlink(
    repo: WorkCopy, path: str, url: str, commit: str, files: dict[str, str | bytes] | None = None
) -> str:
    """Commit ``files``, a .gitmodules naming ``url`` for ``path``, and the gitlink itself."""
    name = path.replace("/", "-")
    gitmodules = f'[submodule "{name}"]\n\tpath = {path}\n\turl = {url}\n'
    existing = repo.path / ".gitmodules"
    if existing.exists():
        gitmodules = existing.read_text() + gitmodules
    await repo.commit({**(files or {}), ".gitmodules": gitmodules})
    await repo.git("update-index", "--add", "--cacheinfo", f"160000,{commit},{path}")
    await repo.git("commit", "--quiet", "-m", f"submodule {path}")
    return await repo.git("rev-parse", "HEAD")


async def three_levels(world: GitWorld, tmp_path: Path) -> tuple[WorkCopy, str, str]:
    """app -> vendor/lib (../lib, not its tip) -> third/leaf (../leaf); returns app, its
    commit and lib's gitlinked commit."""
    leaf = await WorkCopy.create(world, tmp_path, "leaf")
    leaf_commit = await leaf.commit({"leaf.txt": "leaf\n", "run.bat": "echo\n"})
    await leaf.push("main")
    lib = await WorkCopy.create(world, tmp_path, "lib")
    (lib.path / "tool.sh").write_text("#!/bin/sh\n")
    (lib.path / "tool.sh").chmod(0o755)
    (lib.path / "current").symlink_to("tool.sh")
    await lib.commit(
        {
            ".gitattributes": "*.bat text eol=crlf\ndocs/ export-ignore\n",
            "run.bat": "echo lib\n",
            "docs/guide.md": "guide\n",
            "notes.txt": "lib notes\n",
        }
    )
    lib_commit = await with_gitlink(lib, "third/leaf", "../leaf", leaf_commit)
    await lib.commit({"later.txt": "after the gitlinked commit\n"})  # the tip moves on
    await lib.push("main")
    app = await WorkCopy.create(world, tmp_path, "app")
    await app.commit({".gitattributes": "*.txt text eol=crlf\n", "app.txt": "app\n"})
    app_commit = await with_gitlink(app, "vendor/lib", "../lib", lib_commit)
    await app.push("main")
    return app, app_commit, lib_commit


async def archived(world: GitWorld, tmp_path: Path, commit: str, **settings: Any) -> bytes:
    git = Git(make_settings(world, tmp_path, **settings))
    fetched = await git.fetch(push_for("app", "main", commit))
    return await archive_bytes(git, fetched, WITH_SUBMODULES)


async def test_submodules_are_checked_out_recursively_at_their_exact_commits(
    git_world: GitWorld, tmp_path: Path
) -> None:
    app, commit, _ = await three_levels(git_world, tmp_path)
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("app", "main", commit))
    data = await archive_bytes(git, fetched, WITH_SUBMODULES)
    cloned = await checkout(git_world, "app", commit, tmp_path / "checkout", submodules=True)
    assert differences(tree_of_zip(data), tree_of_checkout(cloned)) == []
    tree = tree_of_zip(data)
    assert tree["vendor/lib/docs/guide.md"] == ("file", False, b"guide\n")  # no export-ignore
    assert tree["vendor/lib/tool.sh"][:2] == ("file", True)
    assert tree["vendor/lib/current"] == ("link", b"tool.sh")
    assert tree["vendor/lib/run.bat"] == ("file", False, b"echo lib\r\n")  # lib's attributes
    assert tree["vendor/lib/notes.txt"] == ("file", False, b"lib notes\n")  # not app's
    assert tree["vendor/lib/third/leaf/leaf.txt"] == ("file", False, b"leaf\n")
    assert tree["app.txt"] == ("file", False, b"app\r\n")
    assert "vendor/lib/later.txt" not in tree  # the gitlink's commit, not lib's tip

    # Cached like the repository: archiving again fetches nothing.
    served = git_world.host.upload_pack_count
    again = await archive_bytes(
        git, await git.fetch(push_for("app", "main", commit)), WITH_SUBMODULES
    )
    assert git_world.host.upload_pack_count == served
    assert tree_of_zip(again) == tree

    # Without the extra, a submodule is an empty directory (a clone without --recursive).
    plain = tree_of_zip(await archive_bytes(git, fetched))
    assert plain["vendor/lib"] == ("dir",) and not any(p.startswith("vendor/lib/") for p in plain)
    bare = await checkout(git_world, "app", commit, tmp_path / "plain")
    assert differences(plain, tree_of_checkout(bare)) == []


async def test_attribute_macros_stay_in_their_repository(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """A submodule's own macros apply to its files, the superproject's never do (git reads
    macros from a repository's top-level .gitattributes only)."""
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit(
        {
            ".gitattributes": "[attr]dos text eol=crlf\n*.cmd dos\n*.bat win\n",
            "run.cmd": "a\nb\n",
            "run.bat": "a\nb\n",
            "docs/.gitattributes": "*.md dos\n",
            "docs/guide.md": "a\n",
        }
    )
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    files: dict[str, str | bytes] = {
        ".gitattributes": "[attr]win text eol=crlf\n*.bat win\n*.cmd dos\n",
        "x.bat": "a\n",
    }
    commit = await with_gitlink(app, "sp ace/lib", "../lib", lib_commit, files)
    await app.push("main")
    data = await archived(git_world, tmp_path, commit)
    cloned = await checkout(git_world, "app", commit, tmp_path / "checkout", submodules=True)
    assert differences(tree_of_zip(data), tree_of_checkout(cloned)) == []
    tree = tree_of_zip(data)
    assert tree["x.bat"] == ("file", False, b"a\r\n")
    assert tree["sp ace/lib/run.cmd"] == ("file", False, b"a\r\nb\r\n")  # lib's macro
    assert tree["sp ace/lib/docs/guide.md"] == ("file", False, b"a\r\n")
    assert tree["sp ace/lib/run.bat"] == ("file", False, b"a\nb\n")  # not app's


async def test_the_update_field_of_gitmodules_as_git_reads_it(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """`update = none` leaves the submodule's directory empty, as `git submodule update
    --init` does; `update = !command` fails the push naming it (git refuses it too)."""
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit({"lib.txt": "lib\n"})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    gitmodules = (
        '[submodule "kept"]\n\tpath = kept\n\turl = ../lib\n\tupdate = merge\n'
        '[submodule "none"]\n\tpath = none\n\turl = ../lib\n\tupdate = none\n'
    )
    (app.path / ".gitmodules").write_text(gitmodules)
    await app.git("add", ".gitmodules")
    for path in ("kept", "none"):
        await app.git("update-index", "--add", "--cacheinfo", f"160000,{lib_commit},{path}")
    await app.git("commit", "--quiet", "-m", "two submodules")
    commit = await app.git("rev-parse", "HEAD")
    (app.path / ".gitmodules").write_text(
        gitmodules + '[submodule "command"]\n\tpath = command\n\turl = ../lib\n'
        "\tupdate = !touch pwned\n"
    )
    await app.git("add", ".gitmodules")
    await app.git("update-index", "--add", "--cacheinfo", f"160000,{lib_commit},command")
    await app.git("commit", "--quiet", "-m", "a command")
    hostile = await app.git("rev-parse", "HEAD")
    await app.push("main")
    data = await archived(git_world, tmp_path, commit)
    cloned = await checkout(git_world, "app", commit, tmp_path / "checkout", submodules=True)
    assert differences(tree_of_zip(data), tree_of_checkout(cloned)) == []
    tree = tree_of_zip(data)
    assert tree["kept/lib.txt"] == ("file", False, b"lib\n")
    assert tree["none"] == ("dir",) and not any(p.startswith("none/") for p in tree)
    with pytest.raises(SubmoduleError, match="submodule command: .*update = '!touch pwned'"):
        await archived(git_world, tmp_path, hostile)
    assert not [p async for p in anyio.Path(tmp_path).rglob("pwned")]


async def test_absolute_urls_only_to_allowed_hosts(git_world: GitWorld, tmp_path: Path) -> None:
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit({"lib.txt": "lib\n"})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    absolute = git_world.url_template.format(repository="lib")
    commit = await with_gitlink(app, "vendor/lib", absolute, lib_commit)
    await app.push("main")
    with pytest.raises(SubmoduleError, match="vendor/lib.*BRANCHBUILD_SUBMODULE_HOSTS"):
        await archived(git_world, tmp_path, commit)
    data = await archived(
        git_world, tmp_path, commit, submodule_hosts=f"127.0.0.1:{git_world.host.port}"
    )
    assert tree_of_zip(data)["vendor/lib/lib.txt"] == ("file", False, b"lib\n")


async def test_an_allowed_host_with_an_unknown_key_fails_naming_the_submodule(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """The same SSH host under a name known_hosts does not pin: never trusted on first use,
    a permanent failure naming the submodule."""
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit({"lib.txt": "lib\n"})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    url = f"ssh://git@localhost:{git_world.host.port}/v1/repos/lib"
    commit = await with_gitlink(app, "vendor/lib", url, lib_commit)
    await app.push("main")
    with pytest.raises(SubmoduleError, match="vendor/lib .*cannot be fetched: .*known_hosts"):
        await archived(git_world, tmp_path, commit, submodule_hosts="localhost")


@pytest.mark.parametrize(
    "url",
    [
        "ext::sh -c touch% pwned",
        "file:///etc",
        "https://example.com/lib.git",
        "git@example.com:lib.git",
        "../../../../../etc",
        "/srv/git/lib",
        "--upload-pack=touch%20pwned",
        "-uexample.com:lib",
        "fd::17/lib",
    ],
)
def test_urls_that_are_never_fetched(url: str) -> None:
    with pytest.raises(SubmoduleError, match="submodule vendor/x"):
        resolve_url("ssh://git@host/v1/repos/app", url, ("example.com", "host"), "vendor/x")


@pytest.mark.parametrize(
    "url", ["ssh://-oProxyCommand=touch%20pwned/lib", "ssh://-oProxyCommand=x@host/lib"]
)
def test_urls_that_would_be_ssh_options_are_refused(url: str) -> None:
    with pytest.raises(SubmoduleError, match="vendor/x: .*ssh option"):
        resolve_url("ssh://git@host/v1/repos/app", url, ("*",), "vendor/x")


def test_relative_urls_resolve_as_git_resolves_them(tmp_path: Path) -> None:
    """./x, ../x, ../../group/x against a CodeCommit URL: what `git submodule init` writes."""
    base = "ssh://APKAEXAMPLE@git-codecommit.eu-west-1.amazonaws.com/v1/repos/app"
    urls = ["./x", "../x", "../../group/x", "../x/", ".././x", "../lib.git"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str) -> str:
        done = subprocess.run(  # noqa: S603
            ["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
        )
        return done.stdout

    git("init", "--quiet")
    git("remote", "add", "origin", base)
    for n, url in enumerate(urls):
        git("config", "-f", ".gitmodules", f"submodule.s{n}.path", f"p{n}")
        git("config", "-f", ".gitmodules", f"submodule.s{n}.url", url)
        git("update-index", "--add", "--cacheinfo", f"160000,{n + 1:040d},p{n}")
    git("submodule", "init")
    for n, url in enumerate(urls):
        expected = git("config", f"submodule.s{n}.url").strip()
        assert resolve_url(base, url, (), f"p{n}") == expected, url


async def test_a_submodule_at_an_empty_commit_is_an_empty_directory(
    git_world: GitWorld, tmp_path: Path
) -> None:
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    empty = await lib.git("hash-object", "-w", "-t", "tree", "/dev/null")
    lib_commit = await lib.git("commit-tree", empty, "-m", "nothing yet")
    await lib.git("update-ref", "refs/heads/main", lib_commit)
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    commit = await with_gitlink(app, "lib", "../lib", lib_commit, {"a.txt": "a\n"})
    await app.push("main")
    data = await archived(git_world, tmp_path, commit)
    cloned = await checkout(git_world, "app", commit, tmp_path / "checkout", submodules=True)
    assert differences(tree_of_zip(data), tree_of_checkout(cloned)) == []
    assert tree_of_zip(data)["lib"] == ("dir",)


async def test_a_submodule_that_cannot_be_fetched_fails_naming_it(
    git_world: GitWorld, tmp_path: Path
) -> None:
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    await lib.commit({"lib.txt": "lib\n"})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    gone = await with_gitlink(
        app, "vendor/lib", "../lib", "0123456789abcdef0123456789abcdef01234567"
    )
    await app.push("main")
    with pytest.raises(SubmoduleError, match=r"vendor/lib .*cannot be fetched"):
        await archived(git_world, tmp_path, gone)

    app2 = await WorkCopy.create(git_world, tmp_path, "app2")
    missing = await with_gitlink(app2, "libs/nowhere", "../nowhere", "a" * 40)
    await app2.push("main")
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(SubmoduleError, match=r"libs/nowhere .*cannot be fetched"):
        await archive_bytes(
            git, await git.fetch(push_for("app2", "main", missing)), WITH_SUBMODULES
        )

    app3 = await WorkCopy.create(git_world, tmp_path, "app3")
    await app3.commit({"a.txt": "a\n"})
    await app3.git("update-index", "--add", "--cacheinfo", f"160000,{'b' * 40},undeclared")
    await app3.git("commit", "--quiet", "-m", "gitlink without .gitmodules")
    undeclared = await app3.git("rev-parse", "HEAD")
    await app3.push("main")
    with pytest.raises(SubmoduleError, match="undeclared: no URL"):
        await archive_bytes(
            git, await git.fetch(push_for("app3", "main", undeclared)), WITH_SUBMODULES
        )


async def test_size_limits_count_the_submodules_files(git_world: GitWorld, tmp_path: Path) -> None:
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit({"big.bin": b"x" * 30_000})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    commit = await with_gitlink(app, "vendor/lib", "../lib", lib_commit, {"small.txt": "y"})
    await app.push("main")
    git = Git(make_settings(git_world, tmp_path, max_archive_bytes=20_000))
    fetched = await git.fetch(push_for("app", "main", commit))
    assert await git.check_sizes(fetched) < 20_000  # the superproject alone fits
    with pytest.raises(ArchiveTooLarge, match="BRANCHBUILD_MAX_ARCHIVE_BYTES"):
        await archive_bytes(git, fetched, WITH_SUBMODULES)
    git = Git(make_settings(git_world, tmp_path, max_file_bytes=10_000))
    with pytest.raises(ArchiveTooLarge, match="vendor/lib/big.bin"):
        await archive_bytes(git, fetched, WITH_SUBMODULES)


def test_the_host_list_takes_host_patterns_only() -> None:
    base = {"queue_url": "q", "work_queue_url": "w", "bucket": "bucket"}
    assert load_settings(
        **base, submodule_hosts="git.example.com, *.internal:2222"
    ).submodule_hosts == (
        "git.example.com",
        "*.internal:2222",
    )
    with pytest.raises(ConfigurationError, match="BRANCHBUILD_SUBMODULE_HOSTS"):
        load_settings(**base, submodule_hosts="host\n  ProxyCommand touch pwned")


async def test_a_dropped_submodule_fetch_is_transient_and_names_it(
    git_world: GitWorld, tmp_path: Path
) -> None:
    lib = await WorkCopy.create(git_world, tmp_path, "lib")
    lib_commit = await lib.commit({"big.bin": os.urandom(300_000)})
    await lib.push("main")
    app = await WorkCopy.create(git_world, tmp_path, "app")
    commit = await with_gitlink(app, "vendor/lib", "../lib", lib_commit)
    await app.push("main")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("app", "main", commit))
    git_world.host.drop_after_bytes = 2000
    with pytest.raises(GitError, match="submodule vendor/lib") as info:
        await archive_bytes(git, fetched, WITH_SUBMODULES)
    assert not isinstance(info.value, PermanentError)  # retried through the queue
    git_world.host.drop_after_bytes = None
    data = await archive_bytes(git, fetched, WITH_SUBMODULES)
    assert tree_of_zip(data)["vendor/lib/big.bin"][:2] == ("file", False)
