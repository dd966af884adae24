"""The benchmark's CPU account: what the machine's CPU time per item allows at most."""

from bench.report import cpu_lines


def test_each_phase_says_how_fast_its_cpu_cost_lets_it_go_at_most():
    results = {"cpus": 2,
               "queued": {"create": {"cpu_ms": {"api": 2.0, "postgres": 0.5, "all": 2.5}},
                          "cpu_ms": {"workers": 3.0, "all": 4.0}},
               "raw_rq": {"cpu_ms": {"workers": 1.5, "all": 2.0}},
               "bare": {"single": {"cpu_ms": {"api": 0.4, "all": 0.5}}}}
    lines = cpu_lines(results).splitlines()
    # 2 CPUs at 2.5 ms of the machine's time per accept: 800 a second at most, whatever else happens,
    # and a fifth of what bare Flask's 0.5 ms allows.
    assert lines[1] == ("  single send, workers paused (per request): api 2.00, postgres 0.50, all 2.50; "
                        "ceiling 800 /s, 0.20x")
    assert lines[3] == "  drain, one job each (per email): workers 3.00, all 4.00; ceiling 500 /s, 0.50x"
    assert lines[4] == "      raw RQ no-op: workers 1.50, all 2.00"  # a baseline gets no ceiling of its own


def test_a_phase_without_the_machines_cpu_time_claims_no_ceiling():
    results = {"cpus": 2, "raw_rq": {"cpu_ms": {"workers": 1.5}}, "queued": {"cpu_ms": {"workers": 3.0}}}
    assert "ceiling" not in cpu_lines(results).split("\n", 1)[1]
