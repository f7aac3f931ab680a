"""benchmarks/bench_graphs.py, the prepared GPU check of issue #25, at tiny size on the CPU: as it runs
there (graphs a no-op), and with test_graphs' fake capture standing in for CUDA graphs, so that the
graphed path, the cache report and the timed workload's fit in the graph cache are exercised too."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from test_graphs import FakeCapture

from ldznet_ext.graphs import GraphCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import `common` bare
import bench_graphs  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ARGV = ["--size", "tiny", "--device", "cpu", "--resolution", "64", "--repeats", "1"]
CASES = ["1 term", "4 terms OR-ed", "zero-shot 1 term", "gallery batch 4, 1 term"]
EQUALITY = re.compile(r"^equality, (.+): max \|graphed - eager\| / max \|eager\| = (\S+) \(<= 0.001\) (PASS|FAIL)$",
                      re.MULTILINE)


def equality_lines(output: str) -> list[tuple[str, float, str]]:
    return [(case, float(value), verdict) for case, value, verdict in EQUALITY.findall(output)]


def test_cpu_smoke_run_passes_with_graphed_equal_to_eager(capsys):
    assert bench_graphs.main(ARGV) == 0
    output = capsys.readouterr().out
    # On the CPU graphs are a no-op: the graphed maps are the eager ones exactly
    assert equality_lines(output) == [(case, 0.0, "PASS") for case in CASES]
    assert "graphs engaged: n/a on cpu" in output
    assert "graph cache (head segmenter): 0 captured calls, 0.0 MiB; purposes gone eager: none" in output
    assert "| (c) gallery masks/s at batch 16, graphed (eager) |" in output
    assert output.rstrip().endswith("checks: PASS")


def fake_graph_caches(monkeypatch, offset: float = 0.0) -> list[tuple[GraphCache, FakeCapture]]:
    """Make every graph cache the script creates capture with a fake CPU capture (``offset``: its replays
    disagree with the eager call); returns them in order."""
    made = []

    def cache() -> GraphCache:
        capture = FakeCapture(offset)
        made.append((GraphCache(capture, device_type="cpu"), capture))
        return made[-1][0]

    monkeypatch.setattr(bench_graphs, "GraphCache", cache)
    return made


def test_graphed_path_is_checked_and_the_timed_calls_fit_the_cache(monkeypatch, capsys):
    caches = fake_graph_caches(monkeypatch)
    assert bench_graphs.main(ARGV) == 0
    output = capsys.readouterr().out
    assert equality_lines(output) == [(case, 0.0, "PASS") for case in CASES]
    assert "graphs engaged: PASS" in output
    (head, head_capture), (zero_shot, _), (first_call, first_capture) = caches
    assert first_capture.captured == 2 and len(first_call) == 0  # encode + head, dropped after the timing
    # VAE encode and head at 1, 4 and 16 rows, each captured once: no call was evicted and captured again
    assert head_capture.captured == len(head) == 6
    assert f"graph cache after the timings (head segmenter): 6 captured calls, {6000 / 2**20:.1f} MiB" in output
    assert len(zero_shot) > 0 and not zero_shot.disabled


def test_a_disagreeing_replay_fails_the_checks(monkeypatch):
    """A replay that disagrees with the eager call sends its purpose eager, so the maps still agree:
    the engaged check must fail the run."""
    fake_graph_caches(monkeypatch, offset=1.0)
    with torch.no_grad():
        segmenters = bench_graphs.Segmenters("tiny", 64, torch.device("cpu"), torch.float32)
        assert all(ok for _, _, ok in bench_graphs.equality_checks(segmenters))
        report, engaged = bench_graphs.graphs_engaged(segmenters)
    assert not engaged
    assert report.splitlines() == [
        "graph cache (head segmenter): 0 captured calls, 0.0 MiB; purposes gone eager: encode: its captured graph "
        "disagreed with the eager call; head: its captured graph disagreed with the eager call",
        "graph cache (zero-shot segmenter): 0 captured calls, 0.0 MiB; purposes gone eager: encode: its captured "
        "graph disagreed with the eager call; zero-shot attention: its captured graph disagreed with the eager call",
        "graphs engaged: FAIL"]


def test_the_equality_checks_compare_maps_that_hold_something(monkeypatch):
    """With presence on (the default) the random heads' flat maps were decided "not found" and emptied,
    so three of the four cases compared zeros with zeros and passed whatever a replay returned."""
    compared = []
    real = bench_graphs.relative_difference

    def recording(got, expected):
        compared.append(float(expected.abs().max()))
        return real(got, expected)

    monkeypatch.setattr(bench_graphs, "relative_difference", recording)
    with torch.no_grad():
        segmenters = bench_graphs.Segmenters("tiny", 64, torch.device("cpu"), torch.float32)
        assert all(ok for _, _, ok in bench_graphs.equality_checks(segmenters))
    assert len(compared) == len(CASES) and min(compared) > 0
    assert real(torch.ones(3), torch.zeros(3)) == float("inf")  # an all-zero map can pass no check
