"""Bad input to the command line: every CLI case of tests/fuzz_catalog.py exits with code 2 and
one line on stderr naming the option and the value, before any work starts (the heavy entry
points are stubbed to fail loudly if a case ever reaches them)."""

from __future__ import annotations

import pytest
from fuzz_catalog import CLI_CASES, outcome_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_bad_command_line_is_exit_2_in_one_line_naming_the_option(case, tmp_path):
    outcome, message = outcome_cli(case, tmp_path)
    assert outcome == "error", message
