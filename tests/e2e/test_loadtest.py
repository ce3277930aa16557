"""``worker-gateway loadtest``: end to end with --spawn and --chaos, against --url, and its pure parts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, TOKEN, GatewayProcess, wait_for
from gateway import loadtest


def run_cli(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORKER_GATEWAY_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "gateway", "loadtest", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_spawned_run_with_chaos_loses_nothing_and_exits_0(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    done = run_cli("--spawn", "--sessions", "4", "--turns", "2", "--cpu-s", "1", "--output-mb", "1", "--chaos",
                   "--json", str(report_path))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    assert report["events"]["lost"] == 0 and report["events"]["duplicates"] == 0
    assert report["events"]["sessions_unverified"] == 0
    assert report["turns"] == {"completed": 8, "failed": 0}
    assert report["connections"]["dropped_by_chaos"] >= 1, "chaos never dropped a connection"
    assert report["connections"]["resumes"] >= report["connections"]["dropped_by_chaos"]
    assert report["connections"]["dropped_by_server"] == 0
    assert report["throughput"]["tool_output_bytes"] >= 8 * 1000 * 1000
    assert report["ping_ms"]["count"] > 0 and report["loop_lag_ms"]["samples"] > 0
    assert report["workers"]["peak_healthz"] >= 1 and report["workers"]["peak_processes"] >= 4
    assert report["gateway"]["exit_code"] == 0
    for name in ("turns completed / failed", "events lost (seq gaps)", "app ping p50 / p99 / max", "OK"):
        assert name in done.stdout


def test_run_against_a_running_gateway_by_url(gateway: GatewayProcess, tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    done = run_cli("--url", gateway.http(""), "--token", TOKEN, "--sessions", "2", "--turns", "2", "--cpu-s", "0",
                   "--output-mb", "0.2", "--chunk-kb", "4", "--subagents", "2", "--concurrency", "1",
                   "--json", str(report_path), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["turns"] == {"completed": 4, "failed": 0} and report["events"]["lost"] == 0
    assert report["prompt"] == "cpu_s=0 gil=python output_mb=0.2 chunk_kb=4 subagents=2"
    assert report["gateway"]["spawned"] is False and report["workers"]["peak_processes"] is None
    assert report["connections"]["dropped_by_chaos"] == 0
    # Every session was closed by the load test: the gateway is left as it was found.
    wait_for(lambda: json.loads(loadtest.http_get(loadtest.resolve_target(gateway.http(""), TOKEN),
                                                  "/healthz"))["sessions"] == 0, 10, what="sessions closed")


def test_unreachable_gateway_is_a_setup_error_with_status_2() -> None:
    done = run_cli("--url", "http://127.0.0.1:9", "--token", "x", "--no-progress", timeout=30)
    assert done.returncode == 2
    assert "not reachable" in done.stderr and "Traceback" not in done.stderr


def test_wrong_token_is_a_setup_error_with_status_2_and_a_hint(gateway: GatewayProcess) -> None:
    done = run_cli("--url", gateway.http(""), "--token", "wrong", "--sessions", "1", "--turns", "1",
                   "--cpu-s", "0", "--output-mb", "0", "--no-progress", timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "HTTP 403" in done.stderr and "--token" in done.stderr and "Traceback" not in done.stderr
    assert "turns completed" not in done.stdout  # it failed before any load ran


def test_missing_token_is_a_setup_error_naming_the_flag(gateway: GatewayProcess) -> None:
    done = run_cli("--url", gateway.http(""), "--sessions", "1", "--no-progress", timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs a token" in done.stderr and "--token" in done.stderr


def test_gateway_args_reach_the_spawned_gateway(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    done = run_cli("--spawn", "--gateway-arg=--max-queued-prompts=3", "--gateway-arg", "--replay-max-events=5000",
                   "--sessions", "1", "--turns", "1", "--cpu-s", "0", "--output-mb", "0.1", "--no-progress",
                   "--json", str(report_path))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["gateway"]["limits"]["max_queued_prompts"] == 3
    assert report["gateway"]["limits"]["replay_max_events"] == 5000
    assert report["config"]["gateway_arg"] == ["--max-queued-prompts=3", "--replay-max-events=5000"]


def test_exactly_one_target_is_required() -> None:
    with pytest.raises(SystemExit) as info:
        loadtest.main(["--sessions", "1"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        loadtest.main(["--spawn", "--url", "http://127.0.0.1:1"])


def test_plot_without_matplotlib_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed")
    assert loadtest.main(["--spawn", "--plot", "out.png"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "worker-gateway[plot]" in err


def test_spawned_gateway_that_never_gets_ready_is_a_setup_error_with_its_stderr() -> None:
    done = run_cli("--spawn", "--gateway-arg=--port-is-not-a-flag", "--no-progress", timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "exited with status 2 before it was ready" in done.stderr
    assert "unrecognized arguments: --port-is-not-a-flag" in done.stderr  # the gateway's own stderr
    assert "Traceback" not in done.stderr


def _args(**kw: object) -> argparse.Namespace:
    return loadtest.build_parser().parse_args(["--spawn", *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]])


def test_prompt_follows_the_load_agent_grammar() -> None:
    assert loadtest.load_prompt(_args()) == "cpu_s=1 gil=python output_mb=1"
    assert loadtest.load_prompt(_args(cpu_s=0.5, gil="regex", output_mb=2, chunk_kb=8, subagents=3)) == \
        "cpu_s=0.5 gil=regex output_mb=2 chunk_kb=8 subagents=3"


def test_turns_default_to_two_and_to_unlimited_with_a_duration() -> None:
    assert loadtest.turns_per_session(_args()) == 2
    assert loadtest.turns_per_session(_args(duration=5)) == 0
    assert loadtest.turns_per_session(_args(duration=5, turns=3)) == 3


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert loadtest.percentile(values, 50) == 50
    assert loadtest.percentile(values, 99) == 99
    assert loadtest.percentile(values, 100) == 100
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([7.0], 99) == 7.0


def test_loop_lag_histogram_is_read_from_the_exposition_text() -> None:
    def text(b1: float, b2: float, inf: float, total: float) -> str:
        return (
            "# HELP wg_loop_lag_seconds How late the event loop woke up\n"
            "# TYPE wg_loop_lag_seconds histogram\n"
            f'wg_loop_lag_seconds_bucket{{le="0.001"}} {b1}\n'
            f'wg_loop_lag_seconds_bucket{{le="0.01"}} {b2}\n'
            f'wg_loop_lag_seconds_bucket{{le="+Inf"}} {inf}\n'
            f"wg_loop_lag_seconds_count {inf}\n"
            f"wg_loop_lag_seconds_sum {total}\n"
            "wg_loop_lag_seconds_created 1.7e9\n"
        )

    before = loadtest.parse_histogram(text(10, 10, 10, 0.001), "wg_loop_lag_seconds")
    after = loadtest.parse_histogram(text(60, 109, 110, 0.5), "wg_loop_lag_seconds")
    delta = loadtest.histogram_delta(before, after)
    assert delta is not None and delta["count"] == 100
    assert loadtest.histogram_quantile(delta, 0.5) == 0.001
    assert loadtest.histogram_quantile(delta, 0.99) == 0.01
    assert loadtest.histogram_quantile(delta, 1.0) == float("inf")
    assert loadtest.parse_histogram("", "wg_loop_lag_seconds") is None


def test_spawned_gateway_passes_a_dash_leading_token_intact() -> None:
    from gateway.client.spawn import SpawnedGateway
    from gateway.config import Config

    spawned = SpawnedGateway("--agent=echo", token="-starts-like-a-flag")
    argv = spawned.command()[4:]  # after: python -m gateway serve
    config = Config.load(argv, environ={})
    assert config.token == "-starts-like-a-flag" and config.port == 0
