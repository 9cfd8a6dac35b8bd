"""The one change watcher: a pair of files that moves while it is read is reloaded once."""

from __future__ import annotations

from pathlib import Path

from webhook.files import Reloading, write_atomic


def test_a_pair_completed_while_it_is_read_is_one_reload(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_atomic(a, b"1", mode=0o600)
    write_atomic(b, b"1", mode=0o600)
    finish_pair = False

    def load() -> str:
        nonlocal finish_pair
        value = a.read_text() + b.read_text()
        if finish_pair:  # the writer's second file lands while the first read is under way
            finish_pair = False
            write_atomic(b, b"2", mode=0o600)
        return value

    watch = Reloading((a, b), load, refuse=(OSError,), check_interval=0)
    assert watch.value == "11"
    write_atomic(a, b"2", mode=0o600)
    finish_pair = True
    assert watch.check()
    assert (watch.value, watch.reloads) == ("22", 1)
    assert not watch.check()  # nothing changed since: no second reload of the same version
    assert watch.reloads == 1


def test_an_unchanged_pair_is_not_reloaded(tmp_path: Path) -> None:
    a = tmp_path / "a"
    write_atomic(a, b"x", mode=0o600)
    loads: list[str] = []

    def load() -> str:
        loads.append(a.read_text())
        return loads[-1]

    watch = Reloading((a,), load, refuse=(OSError,))
    assert not watch.check()
    assert (loads, watch.reloads) == (["x"], 0)
