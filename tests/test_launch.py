"""dqgemm.programmatic_launch: the launch policy (no GPU needed)."""

import threading

import pytest

import dqgemm
from dqgemm import launch


def test_off_by_default_and_restored_after_nesting():
    assert not launch.programmatic_launch_enabled()
    with dqgemm.programmatic_launch():
        assert launch.programmatic_launch_enabled()
        with dqgemm.programmatic_launch(False):
            assert not launch.programmatic_launch_enabled()
        assert launch.programmatic_launch_enabled()
    assert not launch.programmatic_launch_enabled()


def test_restored_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with dqgemm.programmatic_launch():
            raise RuntimeError("inside")
    assert not launch.programmatic_launch_enabled()


def test_per_thread():
    seen = []
    with dqgemm.programmatic_launch():
        t = threading.Thread(target=lambda: seen.append(launch.programmatic_launch_enabled()))
        t.start()
        t.join()
        assert launch.programmatic_launch_enabled()
    assert seen == [False]


def test_argument_checked():
    with pytest.raises(TypeError, match="enabled: expected a bool, got 'yes'"):
        with dqgemm.programmatic_launch("yes"):
            pass
