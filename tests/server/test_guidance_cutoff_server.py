"""GuidanceCutoffKSampler on the real server with the full-size random SD1.5 checkpoint."""

from __future__ import annotations

import copy

import harness
import pytest


def spec(name: str) -> dict:
    return harness.workflow_spec(name)


def node_text(entry: dict, node_id: str) -> str:
    return "\n".join((entry.get("outputs") or {}).get(node_id, {}).get("text") or [])


def test_guidance_cutoff_workflow_runs_and_reports(base_url):
    entry = harness.queue_api_prompt(base_url, spec("guidance_cutoff"))
    report = node_text(entry, "5")
    # 5 steps, cutoff 0.6: steps 0-2 with both branches, steps 3-4 with one (batch 1)
    assert "Model rows evaluated: 8 (plain CFG: 10; 20.0 % fewer)" in report, report
    assert "Guidance stopped at step 3 of 5" in report
    assert harness.output_images(entry)


def test_compare_workflow_reports_both_keep_modes(base_url):
    entry = harness.queue_api_prompt(base_url, spec("guidance_cutoff_compare"))
    assert "kept: negative" in node_text(entry, "6")
    assert "kept: positive" in node_text(entry, "7")
    assert len(harness.output_images(entry)) == 5


@pytest.mark.parametrize("inputs,message", [
    ({"cutoff": 9.0, "cutoff_unit": "step"}, "beyond the last step"),
    ({"cutoff": 0.0, "cutoff_unit": "sigma"}, "must be > 0"),
])
def test_bad_cutoff_is_a_clear_error_and_server_keeps_serving(base_url, inputs, message):
    prompt = copy.deepcopy(spec("guidance_cutoff"))
    prompt["5"]["inputs"].update(inputs)
    with pytest.raises(harness.PromptFailed, match=message):
        harness.queue_api_prompt(base_url, prompt)
    # the server still serves, and an unpatched run afterwards works
    entry = harness.queue_api_prompt(base_url, harness.sd15_txt2img_prompt(steps=1))
    assert harness.output_images(entry)
