"""`bench analyze --batch`: per-process and total studies/s of the batch analyze (one process here;
the torchrun path shares `analyze_paths`' sharding, tested in test_sharded_analyze)."""
import pytest

from EchoFMEngine.bench.analyze import cli, run_batch


def test_batch_throughput_counts_every_study(capsys):
    res = run_batch(2, device="cpu")
    assert res["processes"] == 1 and res["studies"] == 2
    assert res["per_rank_studies_per_s"] == [res["sum_of_ranks_studies_per_s"]]
    assert 0 < res["total_studies_per_s"] <= res["sum_of_ranks_studies_per_s"] * 1.05
    assert res["total_studies_per_s"] * res["wall_s"] == pytest.approx(2, rel=0.01)
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert '"rank": 0' in line and '"studies": 2' in line


def test_batch_cli_prints_the_total(capsys, tmp_path):
    from test_batch_robust import make_cines

    make_cines(tmp_path / "in", 2)
    assert cli(["--batch", "0", "--inputs", str(tmp_path / "in"), "--device", "cpu"]) == 0
    assert '"processes": 1, "studies": 2' in capsys.readouterr().out
