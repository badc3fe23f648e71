"""Llava.generate / generate_shared ready for a GPU, checked on the CPU: the host syncs they make
(counted with tests/syncs.py's dispatch mode; the count is the same on any device), and a decode step that
torch.compile takes whole (fullgraph) and that gives eager's tokens.

A host sync is an op whose result the CPU must wait for: `.item()`, `int(t)`, `bool(t)` (all
`_local_scalar_dense`), `nonzero`, `masked_select`, indexing with a boolean mask, `equal`, ...
On a GPU each one stalls Python until the queue of kernels has drained.
"""
import pytest
import torch

from model.llava import Llava, left_pad, preset
from syncs import host_syncs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llava(preset("tiny")).eval()


def prompts(model, batch: int, text: int):
    """Left-padded rows of different lengths, an image in each: ids, mask, pixels."""
    c = model.config
    g = torch.Generator().manual_seed(batch * 100 + text)
    image = [c.image_token_id] * c.num_image_tokens
    rows = [[1] + image + torch.randint(4, 2000, (text + 2 * b,), generator=g).tolist() for b in range(batch)]
    ids, mask = left_pad(rows, 0)
    return ids, mask, torch.randn(batch, 3, c.vision.image_size, c.vision.image_size, generator=g)


# Per call: the left-padding check, the image-placeholder count and its masked assignment, and
# whether the prefill can use plain causal attention.
GENERATE_PER_CALL = 4
# Per call: the suffix checks (2), the prefixes' prefill as in generate (3).
SHARED_PER_CALL = 5


@pytest.mark.parametrize("batch, text, new", [(1, 5, 8), (4, 40, 16)])
def test_generate_syncs_once_per_step(model, batch, text, new):
    """A fixed number per call, whatever the batch and prompt length, then at most one per
    decoded token (how many rows are done), and none when no row can stop (EOS outside the
    vocabulary: a fixed budget). Before: 7 per token at batch 1, 3 in a padded batch (+ 1 per
    token with an EOS)."""
    ids, mask, pixels = prompts(model, batch, text)
    n, ref = host_syncs(lambda: model.generate(ids, pixels, mask, max_new_tokens=new, eos_token_id=-1))
    assert n == GENERATE_PER_CALL and ref.shape == (batch, new)
    # An EOS that the rows meet at different steps (some leave the batch), or never.
    eos = int(ref[0, 2])
    n, out = host_syncs(lambda: model.generate(ids, pixels, mask, max_new_tokens=new, eos_token_id=eos))
    assert n <= GENERATE_PER_CALL + out.shape[1]
    assert batch == 1 or 0 < int((out == eos).any(1).sum()) < batch  # rows left the batch, others went on


def test_generate_shared_syncs_once_per_step(model, batch=5):
    """As generate: a fixed number per call (before: 31 for 8 new tokens, 55 for 16), then at
    most one per decoded token."""
    ids, mask, pixels = prompts(model, 2, 5)
    c = model.config
    feats = model.encode_images(pixels).reshape(-1, c.text.hidden_size)
    pids, pmask = ids[:, :-1], mask[:, :-1]
    owners = torch.arange(batch) % 2
    sids, smask = left_pad([[int(ids[o, -1])] + list(range(10, 10 + b % 3)) for b, o in enumerate(owners)], 0)
    args, kw = (pids, pmask, owners, sids, smask), dict(image_features=feats, max_new_tokens=12)
    n, ref = host_syncs(lambda: model.generate_shared(*args, eos_token_id=-1, **kw))
    assert n == SHARED_PER_CALL
    eos = int(ref[1, 3])
    n, out = host_syncs(lambda: model.generate_shared(*args, eos_token_id=eos, **kw))
    assert n <= SHARED_PER_CALL + out.shape[1]


@pytest.mark.parametrize("batch, text", [(1, 5), (4, 60)])
def test_forward_and_backward_syncs_do_not_grow(model, batch, text):
    """The model's part of a training step (forward, loss, backward): the same few syncs for any
    batch or length: the image-placeholder count, its masked assignment and the causal-mask
    check; backward reads the same mask twice for the visual tokens' gradient."""
    ids, mask, pixels = prompts(model, batch, text)
    n, _ = host_syncs(lambda: model(ids, pixels, mask).logsumexp(-1).sum().backward())
    assert n == 5


def test_decode_step_compiles_whole(model):
    """One decode step (embedding, layers, cache write, logits, greedy choice) traced by dynamo
    with fullgraph=True: a graph break raises. The slot is a tensor, so the next step reuses it."""
    ids, mask, pixels = prompts(model, 3, 5)
    T = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def step(token, position, slot):
        return model.decode_one_token(token, position, slot).argmax(-1)

    compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.setup_cache(3, T + 4)
    try:
        with torch.no_grad():
            token = model(ids, pixels, mask, position_ids=positions)[:, -1].argmax(-1)
            for i in range(3):
                slot, position = torch.tensor([T + i]), positions[:, -1] + i + 1
                got = compiled(token, position, slot)
                assert torch.equal(got, step(token, position, slot))  # the same step again, eagerly
                token = got
    finally:
        model.clear_cache()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_compiled_generation_gives_eager_tokens(model):
    """generate(compile=True) (inductor, on the CPU here) and generate_shared(compile=True): the
    same tokens as eager, with rows leaving the batch at an EOS."""
    ids, mask, pixels = prompts(model, 3, 5)
    ref = model.generate(ids, pixels, mask, max_new_tokens=10, eos_token_id=-1)
    assert torch.equal(model.generate(ids, pixels, mask, max_new_tokens=10, eos_token_id=-1, compile=True), ref)
    kw = dict(max_new_tokens=10, eos_token_id=int(ref[1, 2]))
    assert torch.equal(model.generate(ids, pixels, mask, compile=True, **kw), model.generate(ids, pixels, mask, **kw))
    feats = model.encode_images(pixels).reshape(-1, model.config.text.hidden_size)
    args = (ids[:, :-1], mask[:, :-1], torch.arange(3), ids[:, -1:], mask[:, -1:])
    ref = model.generate_shared(*args, image_features=feats, **kw)
    assert torch.equal(model.generate_shared(*args, image_features=feats, compile=True, **kw), ref)
