"""Submodules over the real SSH git host: checked out at their gitlinks' exact commits as a
`git clone` + `git submodule update --init --recursive` leaves them, or a clear error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


async def test_the_depth_limit_names_the_submodule_too_deep(
    git_world: GitWorld, tmp_path: Path
) -> None:
    _, commit, _ = await three_levels(git_world, tmp_path)
    with pytest.raises(SubmoduleError, match="vendor/lib/third/leaf.*BRANCHBUILD_SUBMODULE_DEPTH"):
        await archived(git_world, tmp_path, commit, submodule_depth=1)


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


@pytest.mark.parametrize(
    "url",
    [
        "ext::sh -c touch% pwned",
        "file:///etc",
        "https://example.com/lib.git",
        "git@example.com:lib.git",
        "../../../../../etc",
    ],
)
def test_urls_that_are_never_fetched(url: str) -> None:
    with pytest.raises(SubmoduleError, match="submodule vendor/x"):
        resolve_url("ssh://git@host/v1/repos/app", url, ("example.com", "host"), "vendor/x")


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
