"""The bench reads the deploy times the lab tests recorded, by their exact names."""

from __future__ import annotations

import json

from bench import remote


def test_deploy_figures_ignore_other_timings_with_similar_names(tmp_path, monkeypatch):
    timings = tmp_path / ".cache" / "lab-timings.json"
    timings.parent.mkdir()
    # Other tests record first, under names that also contain "cold" and "no change".
    timings.write_text(json.dumps({
        "image build cold (bookworm, when cached)": 63.3,
        "lab up again (no change)": 0.0,
        "deploy: cold": 91.9,
        "deploy: no-change re-run": 32.5,
        "deploy: scale-out (+1 worker)": 54.5,
    }))
    monkeypatch.setattr(remote, "REPO", tmp_path)
    monkeypatch.setattr(remote, "TIMINGS_FILE", timings)
    got = remote.deploy_figures(measure=False, inventory=None)
    assert (got["cold_s"], got["no_change_s"], got["scale_out_s"]) == (91.9, 32.5, 54.5)
    assert got["source"] == ".cache/lab-timings.json"


def test_deploy_figures_without_a_timings_file(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "REPO", tmp_path)
    monkeypatch.setattr(remote, "TIMINGS_FILE", tmp_path / ".cache" / "lab-timings.json")
    assert remote.deploy_figures(measure=False, inventory=None) == {
        "source": ".cache/lab-timings.json"}
