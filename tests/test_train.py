"""The training loop: seeds, loss masking, best/last checkpoints, resume."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import yaml

from agcnn.checkpoint import CheckpointError, load_checkpoint
from agcnn.cli import main
from agcnn.config import Config
from agcnn.metrics import masked_bce_with_logits
from agcnn.train.loop import train

K = 14
pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(torch.utils.data.Dataset):
    """A few random images; label 0 marks a bright square, label 3 is missing for some rows.

    ``__getitem__`` adds noise from the global torch RNG, as random augmentation would, so a
    resumed run only matches an uninterrupted one if the RNG state is restored.
    """

    def __init__(self, n: int, seed: int, size: int = 48):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g) * 0.3
        self.y = (torch.rand(n, K, generator=g) < 0.4).float()
        self.y[0, 0], self.y[1, 0] = 1.0, 0.0  # both classes present in every split
        self.x[self.y[:, 0] == 1, :, 8:20, 8:20] += 2.0
        self.y[::3, 3] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i] + 0.05 * torch.randn_like(self.x[i]), "labels": self.y[i], "index": i}


@pytest.fixture(scope="module")
def data():
    return {"train": Tiny(12, 0), "val": Tiny(8, 1)}


def quiet(_msg: str) -> None:
    pass


def test_masked_loss_ignores_missing_labels():
    logits = torch.zeros(2, 3, requires_grad=True)
    labels = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 0.0]])
    loss = masked_bce_with_logits(logits, labels)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0


# ---------------------------------------------------------------------- seeds and runs

def test_missing_seed_checkpoint_is_an_error_naming_it(tmp_path, data, tiny_config):
    with pytest.raises(CheckpointError) as e:
        train(tiny_config(), tmp_path / "run", ["local"], datasets=data, progress=False, say=quiet)
    msg = str(e.value)
    assert str(tmp_path / "run" / "global" / "best.pt") in msg and "run the global stage first" in msg
    with pytest.raises(CheckpointError, match="nowhere.pt"):
        train(tiny_config(), tmp_path / "run", ["fusion"], seed_from=tmp_path / "nowhere.pt", datasets=data, progress=False, say=quiet)


def test_cli_missing_seed_exits_before_loading_data(tmp_path, capsys, tiny_config):
    cfg_path = tmp_path / "c.yaml"
    tiny_config("data.root=" + str(tmp_path / "no_data_here")).dump(cfg_path)
    assert main(["train", "--config", str(cfg_path), "--stage", "fusion", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "local" in err and "best.pt" in err and not (tmp_path / "no_data_here").exists()


def test_three_stages_write_checkpoints_logs_and_config(tmp_path, data, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config("train.global.epochs=3")
    res = train(cfg, run, datasets=data, progress=False, say=quiet)
    assert Config.load(run / "config.yaml").to_dict() == cfg.to_dict()
    for stage in ("global", "local", "fusion"):
        for name in ("best.pt", "last.pt", "log.csv"):
            assert (run / stage / name).is_file()
        last = load_checkpoint(run / stage / "last.pt")
        assert last["config"] == cfg.to_dict() and last["labels"] == list(cfg.labels)
        assert {"optimizer", "scheduler", "rng", "epoch", "step", "best_metric"} <= set(last)
    # best.pt is the epoch with the highest validation mean AUC (the first one on ties).
    hist = load_checkpoint(run / "global" / "last.pt")["history"]
    aucs = [h["val_mean_auc_global"] for h in hist]
    best = load_checkpoint(run / "global" / "best.pt")
    assert best["epoch"] == 1 + aucs.index(max(aucs)) == res["global"].best_epoch
    assert best["metric"] == pytest.approx(max(aucs))
    assert len(best["operating_points"]["global"]) == K
    fusion_best = load_checkpoint(run / "fusion" / "best.pt")
    assert len(fusion_best["operating_points"]["fusion"]) == K
    # Stage II / III left the frozen branches exactly as the stage before them did.
    g = load_checkpoint(run / "global" / "best.pt")["model"]
    loc = load_checkpoint(run / "local" / "best.pt")["model"]
    fus = load_checkpoint(run / "fusion" / "last.pt")["model"]
    assert all(torch.equal(g[k], loc[k]) for k in g if k.startswith("global_branch."))
    assert all(torch.equal(loc[k], fus[k]) for k in loc if not k.startswith("fusion."))
    assert not torch.equal(loc["fusion.weight"], fus["fusion.weight"])
    header = (run / "global" / "log.csv").read_text().splitlines()
    assert len(header) == 4 and header[0].startswith("epoch,step,lr,train_loss,val_mean_auc_global")
    # NaN labels were masked: every logged loss is finite.
    assert all(math.isfinite(h["train_loss"]) for h in hist)
    # A second run into the same folder refuses to overwrite it.
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, run, ["global"], datasets=data, progress=False, say=quiet)


@pytest.mark.parametrize("optim", [[], ["train.global.optimizer=adamw", "train.global.schedule=cosine"]], ids=["sgd-step", "adamw-cosine"])
def test_resume_matches_an_uninterrupted_run(tmp_path, data, tiny_config, optim):
    full = tmp_path / "full"
    train(tiny_config("train.global.epochs=2", *optim), full, ["global"], datasets=data, progress=False, say=quiet)
    part = tmp_path / "part"
    # Interrupted after one epoch, then resumed with the full epochs: a cosine schedule
    # continues on the two-epoch curve, not on the one the first run was started with.
    train(tiny_config("train.global.epochs=1", *optim), part, ["global"], datasets=data, progress=False, say=quiet)
    torch.manual_seed(1234)  # disturb the RNG: resume has to restore it
    train(tiny_config("train.global.epochs=2", *optim), part, ["global"], resume=True, datasets=data, progress=False, say=quiet)
    a, b = load_checkpoint(full / "global" / "last.pt"), load_checkpoint(part / "global" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert len((part / "global" / "log.csv").read_text().splitlines()) == 3
    # Resuming a finished stage skips it.
    res = train(tiny_config("train.global.epochs=2"), part, ["global"], resume=True, datasets=data, progress=False, say=quiet)
    assert res["global"].skipped


def test_config_in_checkpoint_rebuilds_model(tmp_path, data, tiny_config):
    from agcnn.checkpoint import model_from_checkpoint

    run = tmp_path / "run"
    train(tiny_config(), run, ["global"], datasets=data, progress=False, say=quiet)
    model, cfg = model_from_checkpoint(load_checkpoint(run / "global" / "best.pt"))
    assert cfg.model.backbone == "resnet18" and cfg.data.image_size == 32
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["backbone"] == "resnet18"


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, tiny_config):
    """A training process killed with SIGKILL after its first last.pt resumes to the same weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from agcnn.data.synthetic import generate_phantoms

    root = tmp_path / "phantoms"
    generate_phantoms(root, count=40, size=64, seed=0, workers=1)
    cfg_path = tmp_path / "c.yaml"
    tiny_config(f"data.root={root}", "data.synthetic_count=40", "data.synthetic_size=64", "train.global.epochs=4").dump(cfg_path)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agcnn", "train", "--config", str(cfg_path), "--stage", "global",
                             "--out", str(killed), "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "global" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "global" / "last.pt").exists(), proc.stderr.read().decode()[-2000:]
    assert load_checkpoint(killed / "global" / "last.pt")["epoch"] < 4  # it really was interrupted
    assert main(["train", "--out", str(killed), "--resume", "--stage", "global", "--no-progress"]) == 0
    full = tmp_path / "full"
    assert main(["train", "--config", str(cfg_path), "--stage", "global", "--out", str(full), "--no-progress"]) == 0
    a, b = load_checkpoint(full / "global" / "last.pt"), load_checkpoint(killed / "global" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_another_model_or_input_size_is_refused(tmp_path, data, tiny_config):
    from agcnn.config import ConfigError

    run = tmp_path / "run"
    train(tiny_config("train.global.epochs=1"), run, ["global"], datasets=data, progress=False, say=quiet)
    for change, key in (("model.pool=avg", "model.pool"), ("data.resize=40", "data.resize")):
        with pytest.raises(ConfigError, match=key):
            train(tiny_config("train.global.epochs=2", change), run, ["global"], resume=True, datasets=data, progress=False, say=quiet)


def test_checkpoint_from_before_a_model_setting_existed_seeds_with_its_default(tmp_path, data, tiny_config):
    run = tmp_path / "run"
    train(tiny_config("train.global.epochs=1"), run, ["global"], datasets=data, progress=False, say=quiet)
    best = run / "global" / "best.pt"
    ckpt = torch.load(best, weights_only=False)
    del ckpt["config"]["model"]["heatmap"]  # as written before model.heatmap
    torch.save(ckpt, best)
    res = train(tiny_config("train.local.epochs=1"), run, ["local"], datasets=data, progress=False, say=quiet)
    assert res["local"].best_path.is_file()
    from agcnn.config import ConfigError

    # Its default is what it was trained with: another value is refused, naming the key.
    with pytest.raises(ConfigError, match="model.heatmap"):
        train(tiny_config("train.local.epochs=1", "model.heatmap=cam"), tmp_path / "other", ["local"], seed_from=best,
              datasets=data, progress=False, say=quiet)


def test_a_global_stage_serves_a_run_with_another_local_input_and_a_local_stage_does_not(tmp_path, data, tiny_config):
    from agcnn.config import ConfigError

    run = tmp_path / "run"
    train(tiny_config(), run, ["global"], datasets=data, progress=False, say=quiet)
    global_sha = hashlib.sha256((run / "global" / "best.pt").read_bytes()).hexdigest()
    # The control: the local input cropped from the global input (highres = image size), from the
    # same global stage. Its resumed global stage is skipped, not retrained or refused.
    control = ("data.highres_size=32", "model.local_size=40")
    small = {"train": Tiny(12, 0, size=32), "val": Tiny(8, 1, size=32)}
    said: list[str] = []
    res = train(tiny_config(*control), run, ["global", "local"], resume=True, datasets=small, progress=False,
                say=said.append)
    assert hashlib.sha256((run / "global" / "best.pt").read_bytes()).hexdigest() == global_sha
    assert res["local"].best_path.is_file() and load_checkpoint(res["local"].best_path)["config"]["data"]["highres_size"] == 32
    # A local stage's weights did depend on its input: resuming it with another is refused, naming the key.
    with pytest.raises(ConfigError, match=r"data.highres_size: 32 there, 48 here"):
        train(tiny_config(), run, ["local"], resume=True, datasets=data, progress=False, say=quiet)


def test_fusion_head_starts_as_global_unless_seeded_by_a_fusion_checkpoint(tmp_path, data, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config("train.fusion.epochs=1", "train.fusion.lr=0.0", "train.fusion.weight_decay=0.0", "train.fusion_from_global=true")
    train(cfg, run, datasets=data, progress=False, say=quiet)
    fus = load_checkpoint(run / "fusion" / "last.pt")["model"]
    n = fus["global_branch.classifier.weight"].shape[1]
    # lr 0: the head is exactly its start, the global classifier with zero weight on local features.
    assert torch.equal(fus["fusion.weight"][:, :n], fus["global_branch.classifier.weight"])
    assert torch.equal(fus["fusion.bias"], fus["global_branch.classifier.bias"])
    assert not fus["fusion.weight"][:, n:].any()
    # Fine-tuning from a finished fusion checkpoint (G L F*) keeps the head it was given.
    marked = load_checkpoint(run / "fusion" / "best.pt")
    from agcnn.checkpoint import save_checkpoint

    marked["model"]["fusion.weight"].fill_(0.5)
    seed = tmp_path / "seed.pt"
    save_checkpoint(seed, model_state=marked["model"], config=cfg, stage="fusion")
    train(tiny_config("train.fusion.epochs=1", "train.fusion.lr=0.0", "train.fusion.weight_decay=0.0", "train.finetune_all=true"),
          tmp_path / "ft", ["fusion"], seed_from=seed, datasets=data, progress=False, say=quiet)
    ft = load_checkpoint(tmp_path / "ft" / "fusion" / "last.pt")["model"]
    assert torch.all(ft["fusion.weight"] == 0.5)


def test_local_branch_starts_as_the_global_branch_only_when_asked(tmp_path, data, tiny_config):
    def weights(ckpt_path, branch):  # parameters only: batch-norm statistics move even at lr 0
        m = load_checkpoint(ckpt_path)["model"]
        return {k.split(".", 1)[1]: v for k, v in m.items()
                if k.startswith(branch + ".") and "running_" not in k and "num_batches" not in k}

    run = tmp_path / "run"
    train(tiny_config("train.global.epochs=2"), run, ["global"], datasets=data, progress=False, say=quiet)
    still = ("train.local.lr=0.0", "train.local.weight_decay=0.0")
    train(tiny_config(*still, "train.local_from_global=true"), run, ["local"], datasets=data, progress=False, say=quiet)
    g, loc = weights(run / "local" / "last.pt", "global_branch"), weights(run / "local" / "last.pt", "local_branch")
    assert g.keys() == loc.keys() and all(torch.equal(g[k], loc[k]) for k in g)
    # Off (the default): the local branch keeps its own start.
    train(tiny_config(*still), tmp_path / "own", ["local"], seed_from=run / "global" / "best.pt", datasets=data,
          progress=False, say=quiet)
    own = weights(tmp_path / "own" / "local" / "last.pt", "local_branch")
    assert not all(torch.equal(g[k], own[k]) for k in g)
    # Seeded from a stage II checkpoint, the local branch it learned is kept.
    train(tiny_config(*still, "train.local_from_global=true"), tmp_path / "again", ["local"],
          seed_from=tmp_path / "own" / "local" / "last.pt", datasets=data, progress=False, say=quiet)
    again = weights(tmp_path / "again" / "local" / "last.pt", "local_branch")
    assert all(torch.equal(own[k], again[k]) for k in own)


def test_paper_stage_three_random_head_on_augmented_images_with_no_finding(tmp_path, data, tiny_config):
    """The paper's stage III: fusion layer from random, images through the frozen branches every
    epoch (no feature cache), and the 15th "No Finding" output trained but never reported."""
    paper = ("model.no_finding=true", "train.fusion_from_global=false", "train.cache_fusion_features=false")
    messages: list[str] = []
    run = tmp_path / "run"
    cfg = tiny_config(*paper, "train.fusion.epochs=1", "train.fusion.lr=0.0", "train.fusion.weight_decay=0.0")
    train(cfg, run, datasets=data, progress=False, say=messages.append)
    assert not any("cached pool5 features" in m for m in messages)
    fus = load_checkpoint(run / "fusion" / "last.pt")
    w = fus["model"]
    assert w["fusion.weight"].shape[0] == w["global_branch.classifier.weight"].shape[0] == K + 1
    n = w["global_branch.classifier.weight"].shape[1]
    # lr 0: the head is its random start, not the global classifier, and uses the local features.
    assert not torch.equal(w["fusion.weight"][:, :n], w["global_branch.classifier.weight"])
    assert w["fusion.weight"][:, n:].abs().sum() > 0
    # AUC over the 14 findings only.
    best = load_checkpoint(run / "fusion" / "best.pt")
    assert len(fus["history"][0]["per_class"]["fusion"]) == K and len(best["operating_points"]["fusion"]) == K
    # With a learning rate, only the fusion head moves; the frozen branches see augmented images.
    seed = load_checkpoint(run / "local" / "best.pt")["model"]
    train(tiny_config(*paper), tmp_path / "lr", ["fusion"], seed_from=run / "local" / "best.pt", datasets=data,
          progress=False, say=quiet)
    moved = load_checkpoint(tmp_path / "lr" / "fusion" / "last.pt")["model"]
    for key, value in moved.items():
        same = torch.equal(value, seed[key])
        assert same != key.startswith("fusion."), key


class _Plain(torch.utils.data.Dataset):
    """Tiny's images without the per-item noise: the same image every time it is read."""

    def __init__(self, n: int, seed: int):
        self.tiny = Tiny(n, seed)

    def __len__(self) -> int:
        return len(self.tiny)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.tiny.x[i], "labels": self.tiny.y[i], "index": i}


@pytest.fixture(scope="module")
def plain_data():
    return {"train": _Plain(12, 0), "val": _Plain(8, 1)}


def test_local_stage_on_cached_crops_trains_the_local_branch_alone(tmp_path, plain_data, tiny_config):
    run = tmp_path / "run"
    train(tiny_config("train.global.epochs=2"), run, ["global"], datasets=plain_data, progress=False, say=quiet)
    messages: list[str] = []
    cfg = tiny_config("train.cache_local_crops=true", "train.local.epochs=2")
    res = train(cfg, run, ["local"], datasets=plain_data, progress=False, say=messages.append)
    assert any("cached the attended crops of 12 training and 8 validation images" in m for m in messages)
    g = load_checkpoint(run / "global" / "best.pt")["model"]
    loc = load_checkpoint(run / "local" / "last.pt")
    for key, value in loc["model"].items():
        if not key.startswith("fusion."):
            assert torch.equal(value, g[key]) == key.startswith("global_branch."), key
    assert res["local"].best_epoch in (1, 2) and len(loc["history"]) == 2


def test_cached_crops_are_the_attended_crops_and_are_flipped_at_random(tmp_path, plain_data, tiny_config):
    from agcnn.checkpoint import model_from_checkpoint
    from agcnn.runtime import Runtime
    from agcnn.stages import apply_freezing, stage_plan
    from agcnn.train.context import TrainContext
    from agcnn.train.sources import CachedCropSource

    run = tmp_path / "run"
    cfg = tiny_config("train.global.epochs=2")
    train(cfg, run, ["global"], datasets=plain_data, progress=False, say=quiet)
    model, _ = model_from_checkpoint(load_checkpoint(run / "global" / "best.pt"))
    plan = stage_plan("local")
    apply_freezing(model, plan)
    src = CachedCropSource(model, plan, TrainContext(cfg, Runtime(torch.device("cpu")), say=quiet), plain_data, 4)
    model.eval()
    x = torch.stack([plain_data["train"][i]["image"] for i in range(12)])
    with torch.no_grad():
        out, crops = model.attend(x)
    # In dataset order, each image's own crop (stored as float16).
    cached, labels = src.train_set.tensors
    assert cached.dtype == torch.float16 and cached.shape == (12, 3, 32, 32)
    torch.testing.assert_close(cached.float(), crops, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(labels, plain_data["train"].tiny.y, equal_nan=True)
    # Validation: the frozen global branch's probabilities and the local branch on the crops.
    assert src.val_crops["crops"].dtype == np.float32
    probs, val_labels = src.validate()
    xv = torch.stack([plain_data["val"][i]["image"] for i in range(8)])
    with torch.no_grad():
        ref = model(xv, stage="local")
    torch.testing.assert_close(torch.from_numpy(probs["global"]), torch.sigmoid(ref.global_logits), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(probs["local"]), torch.sigmoid(ref.local_logits), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(val_labels), plain_data["val"].tiny.y, equal_nan=True)
    # Training batches: each crop as it is or mirrored, both in one batch of 12.
    model.local_branch.eval()  # batch statistics would make rows depend on each other
    torch.manual_seed(0)
    with torch.no_grad():
        logits, _ = src.logits((cached, labels))
        as_is = torch.isclose(logits, model.local_branch(cached.float()), atol=1e-5).all(1)
        mirrored = torch.isclose(logits, model.local_branch(cached.float().flip(-1)), atol=1e-5).all(1)
    assert (as_is | mirrored).all() and as_is.any() and mirrored.any()


def test_cached_crop_stage_resumes_to_the_same_weights(tmp_path, plain_data, tiny_config):
    run = tmp_path / "run"
    train(tiny_config(), run, ["global"], datasets=plain_data, progress=False, say=quiet)
    seed = run / "global" / "best.pt"
    full, part = tmp_path / "full", tmp_path / "part"
    cached = ("train.cache_local_crops=true",)
    train(tiny_config(*cached, "train.local.epochs=2"), full, ["local"], seed_from=seed, datasets=plain_data,
          progress=False, say=quiet)
    train(tiny_config(*cached, "train.local.epochs=1"), part, ["local"], seed_from=seed, datasets=plain_data,
          progress=False, say=quiet)
    torch.manual_seed(1234)  # disturb the RNG: the flips of epoch 2 come from the restored state
    train(tiny_config(*cached, "train.local.epochs=2"), part, ["local"], resume=True, datasets=plain_data,
          progress=False, say=quiet)
    a, b = load_checkpoint(full / "local" / "last.pt"), load_checkpoint(part / "local" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_crop_cache_too_large_for_the_machine_is_refused_naming_the_setting():
    from agcnn.config import ConfigError
    from agcnn.train.sources import check_crop_cache_fits

    assert check_crop_cache_fits(10, 5, 32) == (10 * 2 + 5 * 4) * 3 * 32 * 32
    with pytest.raises(ConfigError, match=r"train.cache_local_crops=true would hold [\d.]+ GiB of crops \(10000000000 \+ 0 "
                                          r"images x 3 x 224 x 224\).*set train.cache_local_crops=false"):
        check_crop_cache_fits(10**10, 0, 224)


class _Draws(torch.utils.data.Dataset):
    """Each item draws from the RNG, as a random crop would."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.rand(1), "labels": torch.zeros(1), "index": i}


def test_each_rank_draws_its_own_augmentation_on_the_shared_partition(tiny_config):
    from agcnn.runtime import Runtime
    from agcnn.train.loaders import make_loader
    from agcnn.train.seeds import rank_seed

    cfg = tiny_config("data.num_workers=1")
    got = {}
    for rank in (0, 1):
        rt = Runtime(torch.device("cpu"), rank=rank, world=2, distributed=True)
        batches = list(make_loader(_Draws(), 4, train=True, epoch=3, cfg=cfg, rt=rt))
        got[rank] = (torch.cat([b["index"] for b in batches]), torch.cat([b["image"] for b in batches]))
    # The sampler's seed is shared: the two ranks split the data between them, without overlap.
    assert sorted(got[0][0].tolist() + got[1][0].tolist()) == list(range(16))
    # The worker seeds are not: the two ranks' random draws differ.
    assert not torch.equal(got[0][1], got[1][1])
    # Rank 0 draws what a single process draws.
    single = list(make_loader(_Draws(), 4, train=True, epoch=3, cfg=cfg, rt=Runtime(torch.device("cpu"))))
    assert torch.equal(torch.cat([b["image"] for b in single])[: len(got[0][1])], got[0][1])
    assert rank_seed(5, 0) == 5 and rank_seed(5, 1) != 5


def test_sync_batchnorm_converts_only_the_trained_branch_and_keeps_names(tiny_model):
    from agcnn.runtime import Runtime
    from agcnn.stages import stage_plan
    from agcnn.train.parallel import convert_sync_batchnorm

    model = tiny_model
    names = list(model.state_dict())
    with pytest.raises(Exception, match="train.sync_batchnorm=true needs CUDA"):
        convert_sync_batchnorm(model, stage_plan("local"), Runtime(torch.device("cpu"), world=2, distributed=True))
    convert_sync_batchnorm(model, stage_plan("local"), Runtime(torch.device("cuda", 0), world=2, distributed=True))
    kinds = {name: {type(m).__name__ for m in getattr(model, name).modules() if "BatchNorm" in type(m).__name__}
             for name in ("global_branch", "local_branch")}
    assert kinds == {"global_branch": {"BatchNorm2d"}, "local_branch": {"SyncBatchNorm"}}
    assert list(model.state_dict()) == names  # checkpoints stay interchangeable


def test_fusion_head_module_holds_only_the_fusion_layer(tiny_model):
    from agcnn.train.parallel import FuseHead

    model = tiny_model
    head = FuseHead(model)
    assert {n for n, _ in head.named_parameters()} == {"fusion.weight", "fusion.bias"}
    g, l = torch.randn(2, model.global_branch.num_features), torch.randn(2, model.local_branch.num_features)
    assert torch.equal(head(g, l), model.fuse(g, l))


@pytest.mark.parametrize("name,lrs", [("sgd-step", [0.1, 0.1, 0.01, 0.01]), ("adamw-cosine", [0.1, 0.1 * (2 + 2**0.5) / 4, 0.05, 0.1 * (2 - 2**0.5) / 4])])
def test_stage_optimiser_and_schedule_follow_the_config(tiny_model, name, lrs):
    from agcnn.config import StageConfig
    from agcnn.train.step import build_optimizer

    optimizer, schedule = name.split("-")
    sc = StageConfig(epochs=4, lr=0.1, momentum=0.8, weight_decay=0.01, lr_step=2, optimizer=optimizer, schedule=schedule)
    opt, sched = build_optimizer(list(tiny_model.parameters()), sc)
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.01
    assert (group["betas"][0] if optimizer == "adamw" else group["momentum"]) == 0.8
    seen = []
    for _ in range(4):
        seen.append(group["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(lrs)
