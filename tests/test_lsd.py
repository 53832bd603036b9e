"""LSD against a plain per-utterance loop, and a hand-built example."""

import torch

from speechllm.lsd import label_synchronous_compress


def reference_lsd(post, length, blank, threshold):
    """Walk the frames: group runs of equal non-blank argmax, keep blank frames alone, filter."""
    out, t = [], 0
    best = post.argmax(-1).tolist()
    while t < length:
        if best[t] == blank:
            vec, t = post[t], t + 1
        else:
            s = t
            while t < length and best[t] == best[s]:
                t += 1
            vec = post[s:t].mean(0)
        if vec[blank] < threshold:
            out.append(vec)
    return torch.stack(out) if out else post.new_zeros(0, post.shape[-1])


def peaked(ids, vocab, peak):
    x = torch.full((len(ids), vocab), (1 - peak) / (vocab - 1))
    x[torch.arange(len(ids)), torch.tensor(ids)] = peak
    return x


def test_hand_example():
    # frames: a a _ _ b b a ; the first blank is confident (dropped), the second is not (kept)
    post = torch.stack([*peaked([1, 1], 4, 0.8), *peaked([0], 4, 0.95), *peaked([0], 4, 0.6), *peaked([2, 2, 1], 4, 0.7)])
    out, lengths = label_synchronous_compress(post[None], torch.tensor([7]), blank_id=0, blank_threshold=0.9)
    assert lengths.tolist() == [4]
    assert out[0].argmax(-1).tolist() == [1, 0, 2, 1]
    torch.testing.assert_close(out[0, 0], post[0:2].mean(0))
    torch.testing.assert_close(out[0, 2], post[4:6].mean(0))


def test_matches_reference_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        batch, frames, vocab = 4, 50, 7
        # Runs of random labels with sharp/soft peaks so every branch is exercised.
        ids = torch.randint(0, vocab, (batch, frames // 5), generator=g).repeat_interleave(5, 1)
        logits = torch.randn(batch, frames, vocab, generator=g) + 4 * torch.nn.functional.one_hot(ids, vocab)
        post = logits.softmax(-1)
        lengths = torch.randint(1, frames + 1, (batch,), generator=g)
        threshold = [0.5, 0.9][trial % 2]
        out, out_len = label_synchronous_compress(post, lengths, 0, threshold)
        for b in range(batch):
            want = reference_lsd(post[b], int(lengths[b]), 0, threshold)
            assert int(out_len[b]) == want.shape[0]
            torch.testing.assert_close(out[b, : out_len[b]], want)
            assert (out[b, out_len[b]:] == 0).all()


def test_drops_everything_when_all_blank():
    post = peaked([0] * 6, 5, 0.99)[None]
    out, lengths = label_synchronous_compress(post, torch.tensor([6]), 0, 0.9)
    assert lengths.tolist() == [0] and out.shape == (1, 0, 5)
