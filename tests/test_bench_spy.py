"""The benchmark's py-spy summary counts each function once per sample, wherever it sits."""

from __future__ import annotations

from bench.spy import Spy, profile


def test_profile_counts_functions_per_sample_and_ignores_line_numbers(tmp_path):
    raw = tmp_path / "spy-x-1.txt"
    raw.write_text(
        "main (worker.py:10);deliver (notifier/jobs.py:70);get (notifier/store.py:129) 3\n"
        "main (worker.py:10);deliver (notifier/jobs.py:71);deliver (notifier/jobs.py:80) 2\n"
        "main (worker.py:12);execute (redis/client.py:5) 5\n"
        "garbage\n"
    )
    samples, inclusive, own = profile([str(raw)])
    assert samples == 10
    assert inclusive["main (worker.py)"] == 10
    assert inclusive["deliver (notifier/jobs.py)"] == 5  # a recursive frame counts once per sample
    assert own == {"get (notifier/store.py)": 3, "deliver (notifier/jobs.py)": 2, "execute (redis/client.py)": 5}


def test_report_lists_our_frames_below_the_entry_point(tmp_path):
    raw = tmp_path / "spy-drain-1.txt"
    raw.write_text("main (worker.py:1);deliver (notifier/jobs.py:2) 1\nmain (worker.py:1);perform (rq/job.py:3) 3\n")
    spy = Spy(str(tmp_path), enabled=False)
    spy.files["drain"] = [str(raw)]
    report = spy.report()
    assert "drain (4 samples)" in report
    assert "ours: deliver (notifier/jobs.py) 25%" in report  # main() is in (nearly) every sample: left out
    assert "perform (rq/job.py) 75%" in report


def test_disabled_spy_records_nothing(tmp_path):
    spy = Spy(str(tmp_path), enabled=False)
    with spy.record("phase", [1]):
        pass
    assert spy.report() == ""
