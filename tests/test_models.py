"""M2DINO: contract tests over every head kind, upcycling, dispatch, routing, weights, freezing."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from taskgroup.config import BackboneConfig, HeadConfig, ModelConfig, MoEConfig
from taskgroup.data import TaskDataset, collate_examples, load_index
from taskgroup.errors import ConfigError
from taskgroup.losses import task_loss
from taskgroup.models import TaskMoE, build_backbone, build_model, convert_to_moe, decode_outputs, load_share
from taskgroup.runtime import pick_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = ModelConfig(
    backbone=BackboneConfig(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
    moe=MoEConfig(mode="task", num_experts=2, top_k=1, num_layers=1, task_embed_dim=8),
    heads=HeadConfig(hidden=16),
)
ONE_PER_KIND = ["cervix_multi", "breast_3cls", "thyroid_nodule_det", "IUGC"]


def tiny(mode: str = "task", **moe) -> ModelConfig:
    return dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, mode=mode, **moe))


def fake_target(spec, batch: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if spec.kind.short == "seg":
        return torch.randint(0, spec.num_classes, (batch, size, size), generator=g)
    if spec.kind.short == "cls":
        return torch.randint(0, spec.num_classes, (batch,), generator=g)
    if spec.kind.short == "det":
        lo = torch.rand(batch, 2, generator=g) * size / 2
        return torch.cat([lo, lo + size / 4], dim=1)
    return torch.rand(batch, spec.num_keypoints, 2, generator=g) * size


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["dense", "moe", "task", "task_token"])
@pytest.mark.parametrize("task", ONE_PER_KIND)
def test_every_head_trains(registry, device, mode, task):
    torch.manual_seed(0)
    model = build_model(tiny(mode), [registry[t] for t in ONE_PER_KIND]).to(device)
    spec = registry[task]
    images = torch.randn(3, 3, 32, 32, device=device)
    out = model(images, task)
    expected = {"seg": (3, 3, 32, 32), "cls": (3, 3), "det": (3, 5), "reg": (3, 3, 2)}[spec.kind.short]
    assert tuple(out.shape) == expected
    loss = task_loss(spec, out, fake_target(spec, 3, 32).to(device), 32) + model.aux_loss()
    assert torch.isfinite(loss)
    loss.backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0  # reaches the encoder
    assert all(p.grad is not None for p in model.heads[task].parameters())
    other = next(t for t in ONE_PER_KIND if t != task)
    assert all(p.grad is None for p in model.heads[other].parameters())
    if mode in ("task", "task_token"):
        assert model.task_embeddings[task].grad.abs().sum() > 0


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("mode", ["moe", "task", "task_token"])
def test_upcycled_moe_equals_the_dense_model_at_init(registry, mode):
    torch.manual_seed(0)
    dense = build_backbone(TINY.backbone).eval()
    moe = copy.deepcopy(dense)
    routing = {"moe": "token", "task": "task", "task_token": "task_token"}[mode]
    convert_to_moe(moe, num_layers=6, num_experts=4, top_k=2, routing=routing, task_embed_dim=8, num_tasks=3)
    for layer in moe.modules():
        if isinstance(layer, TaskMoE):
            layer.set_context(torch.tensor([0, 2, 1]), torch.randn(3, 8))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(
            moe.forward_features(x).numpy(), dense.forward_features(x).numpy(), atol=1e-5
        )
    assert sum(isinstance(m, TaskMoE) for m in moe.modules()) == 2  # num_layers clamped to depth


def _distinct_moe(routing: str, experts: int = 4, top_k: int = 2) -> TaskMoE:
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    layer = TaskMoE(mlp, 8, experts, top_k, routing, task_embed_dim=5, num_tasks=3)
    for expert in layer.experts:  # make the experts differ
        for p in expert.parameters():
            torch.nn.init.normal_(p)
    return layer


def test_token_dispatch_equals_a_per_token_loop():
    layer = _distinct_moe("token")
    x = torch.randn(2, 7, 8)
    layer.set_context(torch.tensor([0, 1]), None)
    out = layer(x)
    probs = layer.router(x).softmax(-1)
    weights, idx = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for b in range(2):
        for n in range(7):
            for w, e in zip(weights[b, n], idx[b, n], strict=True):
                expected[b, n] += w * layer.experts[int(e)](x[b, n])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_task_routing_single_and_mixed_batches_agree():
    layer = _distinct_moe("task")
    table = torch.randn(3, 5)
    x = torch.randn(4, 6, 8)
    tasks = torch.tensor([0, 2, 2, 0])
    layer.set_context(tasks, table)
    mixed = layer(x)
    for t in (0, 2):
        rows = tasks == t
        layer.set_context(tasks[rows], table)
        torch.testing.assert_close(layer(x[rows]), mixed[rows], atol=1e-5, rtol=1e-5)


def test_aux_loss_balances_and_trains_the_router():
    layer = _distinct_moe("task", experts=4, top_k=1)
    table = torch.zeros(3, 5, requires_grad=True)  # every task on the same expert: unbalanced
    layer.set_context(torch.tensor([0]), table)
    layer(torch.randn(1, 3, 8))
    assert layer.aux_loss.item() == pytest.approx(4 * 1 * 0.25, rel=1e-5)  # f = one-hot, P uniform
    layer.aux_loss.backward()
    assert layer.router.bias.grad.abs().sum() > 0


def test_routing_depends_on_the_task_after_training(tiny_synth, registry):
    """Two tasks with different embeddings use different experts after a few steps on the
    synthetic benchmark; without task conditioning the router never sees the task."""
    tasks = [registry["lung"], registry["IUGC"]]
    index = load_index(tiny_synth / "train", registry, tasks=["lung", "IUGC"])
    cfg = tiny("task", num_experts=4, top_k=1)
    torch.manual_seed(0)
    model = build_model(cfg, tasks)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loaders = {t.id: TaskDataset(t, index[t.id], 32) for t in tasks}
    for step in range(6):
        spec = tasks[step % 2]
        batch = collate_examples([loaders[spec.id][i] for i in range(4)])
        loss = task_loss(spec, model(batch.images, spec.id), batch.targets, 32) + model.aux_loss()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    (layer_load,) = model.expert_load().values()
    share = load_share(torch.stack([layer_load["lung"], layer_load["IUGC"]]))
    assert (share.sum(1) == 1).all()
    assert not torch.equal(share[0], share[1])  # different experts for the two tasks
    token_model = build_model(tiny("moe"), tasks)
    (layer,) = token_model.moe_layers.values()
    assert layer.router.in_features == 32 and layer.routing == "token"


def _save_formats(tmp_path, backbone):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state}, tmp_path / "w.pth")
    official = {}
    for k, v in state.items():  # the official DINOv3 release's key names
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        official[k] = v
    official["mask_token"] = torch.zeros(1, backbone.embed_dim)
    official["rope_embed.periods"] = torch.ones(4)
    torch.save(official, tmp_path / "official.pth")


def test_pretrained_weights_load_from_local_files(tmp_path):
    torch.manual_seed(3)
    source = build_backbone(TINY.backbone).eval()
    _save_formats(tmp_path, source)
    x = torch.randn(2, 3, 32, 32)
    expected = source.forward_features(x)
    for name in ("w.safetensors", "w.pth", "official.pth"):
        torch.manual_seed(4)  # a different random init, overwritten by the file
        loaded = build_backbone(dataclasses.replace(TINY.backbone, pretrained=str(tmp_path / name))).eval()
        torch.testing.assert_close(loaded.forward_features(x), expected), name


def test_pretrained_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    _save_formats(tmp_path, build_backbone(TINY.backbone))
    wider = dataclasses.replace(TINY.backbone, embed_dim=48, pretrained=str(tmp_path / "w.safetensors"))
    with pytest.raises(
        ConfigError,
        match=r"do not fit the backbone: shapes that do not fit: blocks.0.attn.proj.bias: file \(32,\) vs model \(48,\)",
    ):
        build_backbone(wider)
    deeper = dataclasses.replace(TINY.backbone, depth=3, pretrained=str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError, match=r"missing from the file: blocks.2"):
        build_backbone(deeper)
    with pytest.raises(ConfigError, match="file not found"):
        build_backbone(dataclasses.replace(TINY.backbone, pretrained=str(tmp_path / "nope.pth")))


def test_pretrained_moe_is_upcycled_from_the_loaded_weights(tmp_path, registry):
    torch.manual_seed(5)
    source = build_backbone(TINY.backbone)
    _save_formats(tmp_path, source)
    cfg = dataclasses.replace(
        tiny("task"), backbone=dataclasses.replace(TINY.backbone, pretrained=str(tmp_path / "w.pth"))
    )
    model = build_model(cfg, [registry["lung"]])
    for expert in model.backbone.blocks[-1].mlp.experts:
        torch.testing.assert_close(expert.fc1.weight, source.blocks[-1].mlp.fc1.weight)


def test_freezing(registry):
    cfg = dataclasses.replace(tiny("task"), backbone=dataclasses.replace(TINY.backbone, freeze_blocks=1))
    model = build_model(cfg, [registry["lung"]])
    assert not model.backbone.patch_embed.proj.weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.blocks[0].parameters())
    assert all(p.requires_grad for p in model.backbone.blocks[1].parameters())
    cfg = dataclasses.replace(tiny("task"), backbone=dataclasses.replace(TINY.backbone, freeze_encoder=True))
    model = build_model(cfg, [registry["lung"]])
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)


def test_shared_and_task_parameters_partition_the_model(registry):
    model = build_model(tiny("task"), [registry[t] for t in ONE_PER_KIND])
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in model.task_parameters(t)} for t in ONE_PER_KIND]
    everything = {id(p) for p in model.parameters()}
    assert shared.isdisjoint(set().union(*per_task))
    assert shared | set().union(*per_task) == everything
    assert all(a.isdisjoint(b) for i, a in enumerate(per_task) for b in per_task[i + 1 :])
    groups = model.parameter_groups()
    routers = {id(p) for n, p in model.named_parameters() if ".router." in n}
    assert routers <= {id(p) for p in groups["new"]}
    assert {id(p) for p in groups["encoder"]} | {id(p) for p in groups["new"]} == everything


def test_outputs_map_back_to_original_pixels(fixture_root, registry):
    index = load_index(fixture_root, registry)  # images are 40 wide, 30 high
    for task in ("thyroid_nodule_det", "FUGC", "cervix_multi", "breast_3cls"):
        spec = registry[task]
        batch = collate_examples([TaskDataset(spec, index[task], 32)[0]])
        if spec.kind.short == "det":
            output = torch.tensor([[0.25, 0.5, 0.75, 1.0, 0.0]])
            (pred,) = decode_outputs(spec, output, batch, index[task])
            np.testing.assert_allclose(pred.box, [10.0, 15.0, 30.0, 30.0], rtol=1e-6)
        elif spec.kind.short == "reg":
            (pred,) = decode_outputs(spec, torch.tensor([[[0.5, 0.5], [0.1, 1.0]]]), batch, index[task])
            np.testing.assert_allclose(pred.points, [[20.0, 15.0], [4.0, 30.0]], rtol=1e-6)
        elif spec.kind.short == "seg":
            logits = torch.zeros(1, 3, 32, 32)
            logits[0, 2, :16] = 1.0  # class 2 in the top half
            (pred,) = decode_outputs(spec, logits, batch, index[task])
            assert pred.mask.shape == (30, 40) and (pred.mask[:15] == 2).all() and (pred.mask[15:] == 0).all()
            assert pred.mask_path == index[task][0].mask_path
        else:
            (pred,) = decode_outputs(spec, torch.tensor([[0.0, 2.0, 0.0]]), batch, index[task])
            assert pred.predicted_class == 1 and sum(pred.probs) == pytest.approx(1.0)


def test_losses_by_hand():
    from taskgroup.losses import dice_loss, regression_loss, total_loss

    assert total_loss({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": 0.5}).item() == 4.0
    logits = torch.full((1, 2, 2, 2), -20.0)
    target = torch.tensor([[[0, 1], [1, 1]]])
    logits[0, 0][target[0] == 0] = 20.0
    logits[0, 1][target[0] == 1] = 20.0
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)  # perfect prediction
    out = torch.tensor([[[0.5, 0.5]]])
    assert regression_loss(out, torch.tensor([[[16.0, 24.0]]]), 32).item() == pytest.approx((0 + 0.25) / 2)
