"""Hugging Face checkpoint interop: exact (de)quantisation, released-layout fixtures in every MTP key form,
transformers' save_pretrained, round trips and every error naming the tensor or file."""

import json
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

import titan_dsv4
from hf_reference import random_model, transformers_twin
from titan_dsv4.components.hf_checkpoint import CheckpointError, checkpoint_tensors
from titan_dsv4.components.quantization import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8
from titan_dsv4.models.deepseek_v4 import FLAVORS

ARGS = FLAVORS["debugmodel_mtp2"]


# ---------------------------------------------------------------------- formulas
def test_fp8_dequantisation_with_both_scale_dtypes_and_edge_blocks():
    weight = torch.tensor([[1.0, -2.0, 0.5], [448.0, 3.0, -0.25]]).to(torch.float8_e4m3fn)
    e8m0 = torch.tensor([[130, 120]], dtype=torch.uint8)  # 2^3 and 2^-7, block size 2 -> a partial edge block
    expected = torch.tensor([[8.0, -16.0, 0.5 / 128], [3584.0, 24.0, -0.25 / 128]])
    assert torch.equal(dequantize_fp8(weight, e8m0, block=2), expected)
    assert torch.equal(dequantize_fp8(weight, e8m0.view(torch.float8_e8m0fnu), block=2), expected)
    assert torch.equal(dequantize_fp8(weight, torch.tensor([[8.0, 2.0**-7]]), block=2), expected)  # float32
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp8(weight, torch.ones(1, 1), block=2)


def test_fp4_dequantisation_low_nibble_is_the_even_column():
    # byte 0x9F: low nibble 0xF -> -6 (column 0), high nibble 0x9 -> -0.5 (column 1)
    # byte 0x80: low nibble 0x0 -> +0, high nibble 0x8 -> -0
    packed = torch.tensor([[0x9F, 0x80, 0x21, 0x07] * 4], dtype=torch.uint8).view(torch.int8)  # 32 columns
    scale = torch.tensor([[128]], dtype=torch.uint8)  # 2^1
    got = dequantize_fp4(packed, scale)
    assert got[0, :8].tolist() == [-12.0, -1.0, 0.0, -0.0, 1.0, 2.0, 12.0, 0.0]
    assert torch.signbit(got[0, 3])  # the -0 nibble stays negative zero


def test_quantisers_invert_exactly_on_representable_values():
    torch.manual_seed(0)
    w = torch.randn(130, 300)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = dequantize_fp8(q, s)
    assert torch.equal(dequantize_fp8(*quantize_fp8(back)), back)  # idempotent on its own output
    assert (back - w).abs().max() / w.abs().max() < 0.07
    p, s4 = quantize_fp4(w[:, :256])
    assert p.shape == (130, 128) and s4.shape == (130, 8)
    back4 = dequantize_fp4(p, s4)
    assert torch.equal(dequantize_fp4(*quantize_fp4(back4)), back4)


# ---------------------------------------------------------------------- fixtures in the released layout
def released_tensors(model, mtp_form: str, experts: str) -> tuple[dict, dict]:
    """(files' tensors, the weights the model must end up with), written with the safetensors library."""
    n = model.args.num_hidden_layers
    tensors, expected = {}, {}
    for name, value in checkpoint_tensors(model).items():
        value = value.detach()
        hf = re.sub(r"(^|\.)(hc_attn|hc_ffn|hc_head)\.(fn|base|scale)$", r"\1\2_\3", name)
        k = re.match(r"^mtp\.(\d+)\.(.*)$", hf)
        if k and mtp_form != "mtp":
            prefix = "model.layers" if mtp_form == "model.layers" else "layers"
            hf = f"{prefix}.{n + int(k.group(1))}.{k.group(2)}"
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            parts = []
            for e in range(value.shape[0]):
                key = re.sub(r"experts\.(w[123])$", rf"experts.{e}.\1.weight", hf)
                if experts == "fp4":
                    q, s = quantize_fp4(value[e])
                    parts.append(dequantize_fp4(q, s))
                else:
                    q, s = quantize_fp8(value[e])
                    parts.append(dequantize_fp8(q, s))
                tensors[key], tensors[key[: -len(".weight")] + ".scale"] = q, s
            expected[name] = torch.stack(parts)
        elif re.search(r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|shared_experts|e_proj|h_proj", name):
            q, s = quantize_fp8(value)
            tensors[hf], tensors[hf[: -len(".weight")] + ".scale"] = q, s.float() if "wkv" in name else s
            expected[name] = dequantize_fp8(q, s)
        elif name.endswith("tid2eid"):
            tensors[hf] = value.int()  # int32 on disk in the reference
            expected[name] = value
        else:
            tensors[hf] = value.to(torch.bfloat16) if value.dim() >= 2 and "fn" not in name else value
            expected[name] = tensors[hf].float()
    return tensors, expected


def write_folder(path, tensors, args, shards=2):
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(path / file))
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(args.to_hf_config()))


@pytest.mark.parametrize("mtp_form", ["mtp", "model.layers", "layers"])
@pytest.mark.parametrize("experts", ["fp4", "fp8"])
def test_released_layout_loads_in_every_mtp_form(tmp_path, mtp_form, experts):
    model = random_model(ARGS)
    tensors, expected = released_tensors(model, mtp_form, experts)
    write_folder(tmp_path, tensors, ARGS)
    loaded = titan_dsv4.from_pretrained(tmp_path, dtype=torch.float32)
    state = checkpoint_tensors(loaded)
    assert state.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.equal(state[name].float(), want.float()), name
    assert loaded.mtp["1"].e_proj.weight.abs().sum() > 0  # MTP really loaded, depth 1 included


def test_an_expert_parallel_rank_reads_only_its_experts(tmp_path, monkeypatch):
    from titan_dsv4.components import hf_checkpoint
    from titan_dsv4.components.hf_checkpoint import HFCheckpointReader, _full_shapes

    model = random_model(ARGS)
    tensors, expected = released_tensors(model, "mtp", "fp4")
    write_folder(tmp_path, tensors, ARGS)
    reader = HFCheckpointReader(tmp_path, ARGS, {k: v.shape for k, v in _full_shapes(ARGS).items()})
    read, weight = [], hf_checkpoint._weight
    monkeypatch.setattr(hf_checkpoint, "_weight", lambda folder, key, scale: read.append(key) or
                        weight(folder, key, scale))
    rows = reader.load("layers.1.ffn.experts.w2", slice(2, 4))
    assert torch.equal(rows.float(), expected["layers.1.ffn.experts.w2"][2:4].float())
    assert read == ["layers.1.ffn.experts.2.w2.weight", "layers.1.ffn.experts.3.w2.weight"]


def test_fewer_mtp_depths_skip_the_rest_with_a_log(tmp_path, caplog):
    tensors, _ = released_tensors(random_model(ARGS), "mtp", "fp4")
    write_folder(tmp_path, tensors, ARGS)
    with caplog.at_level(logging.WARNING):
        loaded = titan_dsv4.from_pretrained(tmp_path, dtype=torch.float32, num_mtp_layers=1)
    assert len(loaded.mtp) == 1 and "skipping MTP depths [1]" in caplog.text


def test_transformers_save_pretrained_loads_with_the_same_logits(tmp_path):
    reference = transformers_twin(random_model(ARGS.with_mtp_layers(0), seed=4))
    reference.save_pretrained(tmp_path)
    ours = titan_dsv4.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ARGS.vocab_size, (2, 45))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        assert (ours(ids) - want).abs().max() <= 1e-4 * want.abs().max()


def test_bf16_round_trip_is_bit_exact(tmp_path):
    titan_dsv4.save_pretrained(random_model(ARGS), tmp_path / "a")  # bf16 on disk (fp32 for mHC, sinks, ...)
    model = titan_dsv4.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    titan_dsv4.save_pretrained(model, tmp_path / "b")
    again = titan_dsv4.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    first, second = checkpoint_tensors(model), checkpoint_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    assert model.layers["0"].attn.wq_a.weight.dtype == torch.bfloat16
    assert model.layers["0"].hc_attn.fn.dtype == torch.float32  # mHC stays fp32


def test_fp8_export_loads_back_close(tmp_path):
    model = random_model(ARGS)
    titan_dsv4.save_pretrained(model, tmp_path, quantize="fp8")
    loaded = titan_dsv4.from_pretrained(tmp_path, dtype=torch.float32)
    w, got = model.layers["1"].attn.wq_b.weight, loaded.layers["1"].attn.wq_b.weight
    assert not torch.equal(w, got) and (w - got).abs().max() < 0.07 * w.abs().max()


def _saved(path, model):
    titan_dsv4.save_pretrained(model, path, dtype=torch.float32)
    return path


# ---------------------------------------------------------------------- errors
def _edit_and_load(tmp_path, edit):
    tensors, _ = released_tensors(random_model(ARGS), "mtp", "fp4")
    edit(tensors)
    write_folder(tmp_path, tensors, ARGS)
    return titan_dsv4.from_pretrained(tmp_path, dtype=torch.float32)


def test_missing_tensor_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing tensors for mtp\.0\.e_proj\.weight"):
        _edit_and_load(tmp_path, lambda t: (t.pop("mtp.0.e_proj.weight"), t.pop("mtp.0.e_proj.scale")))


def test_unexpected_tensor_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"unexpected tensors layers\.0\.attn\.extra\.weight"):
        _edit_and_load(tmp_path, lambda t: t.update({"layers.0.attn.extra.weight": torch.zeros(2)}))


def test_wrong_shape_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"'layers\.2\.attn_norm\.weight' has shape \(3,\)"):
        _edit_and_load(tmp_path, lambda t: t.update({"layers.2.attn_norm.weight": torch.ones(3)}))


def test_truncated_file_is_named(tmp_path):
    saved = _saved(tmp_path / "ckpt", random_model(ARGS))
    shard = next(saved.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        titan_dsv4.from_pretrained(saved, dtype=torch.float32)


def test_missing_index_entry_is_named(tmp_path):
    saved = _saved(tmp_path / "ckpt", random_model(ARGS))
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.1.attn.wkv.weight"]
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing from the index: layers\.1\.attn\.wkv\.weight"):
        titan_dsv4.from_pretrained(saved, dtype=torch.float32)
