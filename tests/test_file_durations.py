"""The table that orders the suite's files for the xdist workers (tests/file_durations.py)."""

from tests.file_durations import file_seconds

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.train.test_grpo" name="test_a" time="1.5"/>
<testcase classname="tests.train.test_grpo" name="test_b[x]" time="2.25"/>
<testcase classname="tests.serve.test_api.TestRoutes" name="test_c" time="0.5"/>
<testcase classname="tests.test_harness" name="test_d" time="4"><skipped message="no"/></testcase>
</testsuite></testsuites>
"""


def test_a_junit_report_is_summed_per_file(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(REPORT)
    assert file_seconds(report) == {"tests/train/test_grpo.py": 3.75, "tests/serve/test_api.py": 0.5,
                                    "tests/test_harness.py": 4.0}
