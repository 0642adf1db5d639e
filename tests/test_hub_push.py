"""examples/run_cusa.py --push_to_hub: each run goes to its own repo with its own card (the Hub API mocked at its HTTP
calls: create_repo, the README metadata check (POST /api/validate-yaml) and create_commit; nothing leaves the
machine). With hf_xet installed, upload_folder streams files through xet instead of one create_commit: the test takes
the create_commit path, which uploads the same files."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData, RepoUrl
from test_run_cusa import run_cusa, shapes, tiny_backbone, tiny_run_args  # noqa: F401  (fixtures)

from cusa_hf.evaluation.metrics import RETRIEVAL_METRIC_NAMES
from cusa_hf.model_card import CARD_TAG, metrics_from_eval_results


@dataclass
class Commit:
    repo_id: str
    message: str
    files: dict[str, bytes]  # path in the repo -> content at commit time
    local_paths: list[Path] = field(default_factory=list)


class FakeHub:
    """Records the repos created, the READMEs sent for validation and, for each commit, the files it would upload
    (read when the commit is made)."""

    def __init__(self, monkeypatch):
        self.created, self.validated, self.commits = [], [], []
        # Plain functions on the class: HfApi instances call them as methods (``api`` is the instance).
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: self.create_repo(*args, **kwargs))
        monkeypatch.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: self.create_commit(*args, **kwargs))
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, **kwargs: self.validate_yaml(content))
        monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def validate_yaml(self, content: str) -> None:
        """The Hub refuses a README whose metadata does not parse; so does this (no ``ignore_metadata_errors``)."""
        self.validated.append(content)
        ModelCardData(**yaml.safe_load(content.split("---")[1]))

    def create_commit(self, repo_id, operations, commit_message="", **kwargs):
        commit = Commit(repo_id, commit_message, {})
        for operation in operations:
            commit.local_paths.append(Path(operation.path_or_fileobj))
            commit.files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
        self.commits.append(commit)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=commit_message,
            commit_description="",
            oid="0" * 40,
        )

    def final_commit(self, repo_id: str) -> Commit:
        return [commit for commit in self.commits if commit.repo_id == repo_id][-1]


def retrieval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    names = tuple(f"{split}_{name}" for split in ("validation", "test") for name in RETRIEVAL_METRIC_NAMES)
    return {key: value for key, value in metrics.items() if key in names}


def pushed_card(commit: Commit) -> ModelCard:
    text = commit.files["README.md"].decode("utf-8")
    # The metadata block is plain YAML a Hub parser reads: the model-index values are the run's metrics.
    assert isinstance(yaml.safe_load(text.split("---")[1])["model-index"], list)
    return ModelCard(text)


def test_a_comparison_pushes_cusa_and_the_baseline_to_two_repos_each_with_its_card(
    tiny_backbone, shapes, tmp_path, monkeypatch  # noqa: F811
):
    hub = FakeHub(monkeypatch)
    output_dir = tmp_path / "run"
    argv = tiny_run_args(tiny_backbone, shapes, output_dir, "--compare_with_baseline", "true", "--push_to_hub", "true",
                         "--hub_model_id", "me/x")  # fmt: skip
    run_cusa.main(argv)
    results = json.loads((output_dir / "results.json").read_text())

    assert set(hub.created) == {"me/x", "me/x-baseline"}
    for repo_id, run in (("me/x", "cusa"), ("me/x-baseline", "baseline")):
        # Every commit to a repo (the checkpoints pushed during training too) uploads from that run's folder only.
        for commit in (commit for commit in hub.commits if commit.repo_id == repo_id):
            assert all(path.is_relative_to(output_dir / run) for path in commit.local_paths), commit.message
        final = hub.final_commit(repo_id)
        assert final.message == f"CUSA run {run}"
        assert {"README.md", "config.json", "model.safetensors", "modeling_cusa.py"} <= set(final.files)
        assert json.loads(final.files["config.json"])["use_csa"] == (run == "cusa")
        card = pushed_card(final)
        assert final.files["README.md"].decode("utf-8") in hub.validated
        assert CARD_TAG in card.data.tags and card.data.model_name == repo_id.split("/")[1]
        assert metrics_from_eval_results(card.data.eval_results) == retrieval_metrics(results[run])
        assert f'CusaModel.from_pretrained("{repo_id}")' in card.text
        # The pushed card is the one in the run's folder: the Trainer did not write its own over it.
        assert final.files["README.md"] == (output_dir / run / "README.md").read_bytes()
    baseline, cusa = pushed_card(hub.final_commit("me/x-baseline")), pushed_card(hub.final_commit("me/x"))
    assert "InfoNCE baseline" in baseline.text and "No CSA, no USA, no teachers" in baseline.text
    assert "infonce-baseline" in baseline.data.tags and "cusa" not in baseline.data.tags
    assert "**CUSA**" in cusa.text and "offline:all-MiniLM-L6-v2" in cusa.text and "| csa_weight | 0.1 |" in cusa.text


@pytest.mark.parametrize("cusa", ["false", "true"])
def test_a_single_run_pushes_to_hub_model_id_as_given(cusa, tiny_backbone, shapes, tmp_path, monkeypatch):  # noqa: F811
    hub = FakeHub(monkeypatch)
    argv = tiny_run_args(tiny_backbone, shapes, tmp_path / "run", "--cusa", cusa, "--push_to_hub", "true",
                         "--hub_model_id", "me/solo", "--num_train_epochs", "1")  # fmt: skip
    results = run_cusa.main(argv)
    label = "cusa" if cusa == "true" else "baseline"
    assert set(hub.created) == {"me/solo"}
    card = pushed_card(hub.final_commit("me/solo"))
    assert metrics_from_eval_results(card.data.eval_results) == retrieval_metrics(results[label])
    assert ("InfoNCE baseline" in card.text) == (label == "baseline")
