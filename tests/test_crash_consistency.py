"""Training killed with SIGKILL at random moments and restarted ends bit-identical to a run never killed
(the short version of `benchmarks/crash_soak.py`, whose 20-kill figures the README quotes)."""

from benchmarks import crash_soak


def test_three_sigkills_during_training_end_bit_identical_to_a_run_never_killed(tmp_path):
  report = crash_soak.soak(tmp_path, kills=3, num_steps=12, seed=0)
  assert report["kills"] == 3, report
  assert report["damaged_checkpoints_seen"] == 0 and report["restarts_from_zero"] == 0, report
  assert report["final_step"] == 12 and report["bit_identical"] and report["passed"], report
  assert report["resumed_from"][-1] > 0, report  # the last restart continued a killed run
