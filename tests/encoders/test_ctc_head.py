"""The BiLSTM CTC head: two unidirectional LSTMs on padded batches equal one packed bidirectional LSTM."""

import torch
from safetensors.torch import save_file

from speechllm.encoders.ctc import CTCHead

UNITS = ["<blank>", " ", "a", "b", "c"]


def packed_reference(head: CTCHead, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The textbook way: one bidirectional nn.LSTM with the head's weights over packed sequences."""
    lstm = torch.nn.LSTM(feats.shape[-1], head.meta["hidden"], batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name, p in head.rnn_forward.named_parameters():
            getattr(lstm, name).copy_(p)
        for name, p in head.rnn_backward.named_parameters():
            getattr(lstm, f"{name}_reverse").copy_(p)
    packed = torch.nn.utils.rnn.pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
    states, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=feats.shape[1])
    return head.out(states)


def test_bilstm_head_equals_packed_bidirectional_lstm():
    torch.manual_seed(0)
    head = CTCHead(6, UNITS, kind="bilstm", hidden=5)
    feats, lengths = torch.randn(3, 9, 6), torch.tensor([9, 4, 6])
    out = head(feats, lengths)
    reference = packed_reference(head, feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], reference[b, :n])


def test_head_saved_from_a_bidirectional_lstm_loads(tmp_path):
    torch.manual_seed(1)
    head = CTCHead(6, UNITS, kind="bilstm", hidden=5)
    old = {}
    for name, p in head.rnn_forward.named_parameters():
        old[f"rnn.{name}"] = p.detach().clone()
    for name, p in head.rnn_backward.named_parameters():
        old[f"rnn.{name}_reverse"] = p.detach().clone()
    old.update({f"out.{k}": v for k, v in head.out.state_dict().items()})
    head.save(tmp_path)
    save_file(old, str(tmp_path / "head.safetensors"))  # the former layout
    again = CTCHead.load(tmp_path)
    feats, lengths = torch.randn(2, 7, 6), torch.tensor([7, 3])
    torch.testing.assert_close(again(feats, lengths), head(feats, lengths))
