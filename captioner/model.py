"""The Show and Tell decoder (Vinyals et al. 2015) in one file.

The image embedding is the LSTM's first input only (x_{-1} = W_i CNN(I)); then each word is embedded
and fed in turn (teacher forcing), and a linear layer over the LSTM state scores the next word.
Loss is cross-entropy over real tokens only: outputs are packed, so padding costs neither compute nor loss.

With `regions` > 0 (encoder pool "regions") the features also hold a grid of region vectors, and each
output attends over them before scoring words (Luong et al. 2015's attention on top of the LSTM output):
the LSTM still runs over the whole sentence in one call, so training costs about what it did.
Scheduled sampling (`forward`'s `sample_prob`) must unroll the LSTM one step at a time instead.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

State = tuple[torch.Tensor, ...]  # (h, c) or, with regions, (h, c, memory)
ROWS = 256


def lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTM's update from its pre-activation gates (i, f, g, o), for the loops that compute the gates
    themselves (the unrolled training pass, decoding's fast step). Returns (h, c)."""
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@dataclass
class DecoderConfig:
    vocab_size: int
    feature_dim: int = 1280
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    regions: int = 0  # region vectors after the global one in each feature row (0: no attention)
    att_dim: int = 256
    att_dropout: float = 0.5  # on the region vectors themselves: attention learns the training images fast

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        names = {f.name for f in fields(cls)}
        unknown = [k for k, v in d.items() if k not in names and v]  # an option this version no longer has
        if unknown:
            raise ValueError(f"decoder options this version does not support: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in names})


def attention_record(weights: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One attention step as a row per sequence [N, R + 1]: its weights over the R regions, then the global
    share, ||hidden|| / (||hidden|| + ||context||), the LSTM output's part of what scores the word (the global
    vector reaches a word only through it, as the LSTM's first input; context is what the regions gave)."""
    h, ctx = hidden.float().norm(dim=-1), context.float().norm(dim=-1)
    share = h / (h + ctx).clamp_min(torch.finfo(h.dtype).tiny)
    return torch.cat([weights.reshape(hidden.shape[0], -1).float(), share.unsqueeze(-1)], -1)


class ShowAndTell(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.regions < 0 or cfg.att_dim < 1 or not 0 <= cfg.att_dropout < 1:
            raise ValueError(f"bad attention settings: regions {cfg.regions}, att_dim {cfg.att_dim}, "
                             f"att_dropout {cfg.att_dropout}")
        channels = cfg.feature_dim // (cfg.regions + 1)
        if channels * (cfg.regions + 1) != cfg.feature_dim:
            raise ValueError(f"{cfg.feature_dim}-d features do not split into {cfg.regions + 1} equal vectors")
        self.image_embed = nn.Linear(channels, cfg.embed_dim)
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        if cfg.regions:
            self.att_key = nn.Linear(channels, cfg.att_dim)
            self.att_value = nn.Linear(channels, cfg.att_dim)
            self.att_query = nn.Linear(cfg.hidden_dim, cfg.att_dim, bias=False)
            self.att_out = nn.Linear(cfg.att_dim, cfg.hidden_dim, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden)

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer as one [V, H] weight and its bias, for decoding's precomputed step."""
        return self.out.weight, self.out.bias

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """The global feature's embedding: the LSTM's first input."""
        return self.dropout(self.image_embed(features[:, : self.image_embed.in_features]))

    def memory(self, features: torch.Tensor) -> torch.Tensor:
        """The image's regions as keys and values in the hidden state's space, [R, B, 2H] (rows on axis 1, as
        in the LSTM state). The query and output projections are folded into them, once per image:
        (W_q h).k = h.(W_q^T k) and W_o(sum a v) = sum a W_o v, so a decoding step only takes dot products."""
        regions = features[:, self.image_embed.in_features:].unflatten(1, (self.cfg.regions, -1)).transpose(0, 1)
        regions = F.dropout(regions, self.cfg.att_dropout, self.training)
        keys = self.att_key(regions) @ self.att_query.weight / math.sqrt(self.cfg.att_dim)
        values = self.dropout(self.att_value(regions))
        return torch.cat([keys, self.att_out(values)], -1)

    @property
    def memory_dim(self) -> int:
        """Width of `memory`'s rows: keys and output values [H each]."""
        return 2 * self.cfg.hidden_dim

    def attention(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Each row's weights over its image's regions. memory [R, M, 2H] holds M images; hidden's rows are
        theirs in order, the same number each ([M, T, H] in training, [M*K, H] for K beams)."""
        H = hidden.shape[-1]
        keys = memory.transpose(0, 1)[..., :H]  # [M, R, H]
        h = hidden.reshape(keys.shape[0], -1, H)
        return torch.softmax(h @ keys.transpose(1, 2), -1)  # [M, rows per image, R]

    def attend(self, hidden: torch.Tensor, memory: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """hidden plus what it reads from its image's regions. `record`, a list, gets this call's
        `attention_record` appended (decoding's opt-in, to show what each word looked at)."""
        H = hidden.shape[-1]
        values = memory.transpose(0, 1)[..., H:]  # [M, R, H]
        weights = self.attention(hidden, memory)
        context = (weights @ values).view(hidden.shape)
        if record is not None:
            record.append(attention_record(weights, hidden, context))
        return hidden + context

    def _unroll(self, packed: PackedSequence, memory: torch.Tensor | None, sample_prob: float) -> PackedSequence:
        """The one-layer LSTM over a packed batch one step at a time, for scheduled sampling (Bengio et al.
        2015): with probability `sample_prob` a word's input is a word drawn from the model's own previous
        prediction instead of the reference's. Gates are nn.LSTM's (i, f, g, o); the words' part of the input
        projection is one matrix product for the whole batch, as nn.LSTM does it."""
        lstm = self.lstm
        w_word = lstm.weight_ih_l0
        bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
        xs = F.linear(packed.data, w_word, bias).split(packed.batch_sizes.tolist())
        if memory is not None:
            memory = memory[:, packed.sorted_indices]  # rows in the packed (longest first) order
        h = c = packed.data.new_zeros(int(packed.batch_sizes[0]), lstm.hidden_size)
        outs = []
        for t, x in enumerate(xs):
            n = x.shape[0]
            h, c = h[:n], c[:n]
            if sample_prob and t >= 2:  # step 0 reads the image, step 1 <start>
                pick = torch.rand(n, device=x.device) < sample_prob
                if bool(pick.any()):
                    with torch.no_grad():
                        hid = self.attend(h[pick], memory[:, :n][:, pick]) if memory is not None else h[pick]
                        words = torch.multinomial(torch.softmax(self.logits(hid).float(), -1), 1).squeeze(1)
                    x = x.clone()
                    x[pick] = F.linear(self.dropout(self.word_embed(words)), w_word, bias).to(x.dtype)
            gates = x + F.linear(h, lstm.weight_hh_l0)
            h, c = lstm_update(gates.to(h.dtype), c)  # state stays full precision under autocast
            outs.append(h)
        return PackedSequence(torch.cat(outs), packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                sample_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets for every real next-token position, packed (no padding).

        captions: [B, T] ids `<start> w1 .. wn <end> <pad>..`; lengths: [B] counts including start and end.
        sample_prob: scheduled sampling's chance that a word's input is the model's own (training only).
        """
        sample_prob = sample_prob if self.training else 0.0
        if sample_prob and self.cfg.num_layers != 1:
            raise ValueError("scheduled sampling needs a one-layer LSTM")
        words = self.dropout(self.word_embed(captions[:, :-1]))
        inputs = torch.cat([self.embed_image(features).unsqueeze(1), words], dim=1)  # image, <start>, w1..wn
        lengths = lengths.cpu()
        packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        memory = self.memory(features) if self.cfg.regions else None
        out = self._unroll(packed, memory, sample_prob) if sample_prob else self.lstm(packed)[0]
        # Drop the image step's output: outputs after <start>..wn predict w1..<end>.
        hidden, _ = pad_packed_sequence(out, batch_first=True)
        hidden = hidden[:, 1:]
        if self.cfg.regions:
            hidden = self.attend(hidden, memory)
        hidden = pack_padded_sequence(hidden, lengths - 1, batch_first=True, enforce_sorted=False).data
        targets = pack_padded_sequence(captions[:, 1:], lengths - 1, batch_first=True, enforce_sorted=False).data
        # Round the token count up to a multiple of ROWS: with --amp every new shape makes oneDNN build and
        # keep another bf16 matmul, and the process grows (eval/RESULTS.md, "Speed").
        n = hidden.shape[0]
        return self.logits(self.dropout(F.pad(hidden, (0, 0, 0, -n % ROWS))))[:n], targets

    def loss(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
             sample_prob: float = 0.0) -> torch.Tensor:
        """Mean token cross-entropy."""
        logits, targets = self(features, captions, lengths, sample_prob)
        return F.cross_entropy(logits, targets)

    # --- step-by-step interface used by greedy and beam search ---
    def init_state(self, features: torch.Tensor) -> State:
        """LSTM state after reading the image (the paper's x_{-1} step); with regions, their memory follows
        (h, c), one row per image (beam search gives each image K rows of h and c, but one of memory)."""
        image = self.embed_image(features)
        lstm = self.lstm
        if self.training and lstm.num_layers > 1:  # keep nn.LSTM's dropout between layers
            _, state = lstm(image.unsqueeze(1))
        else:  # the same step from a zero state without an nn.LSTM call, which costs ~5 ms on CPU for one row
            first = F.linear(image, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
            state = self.upper_layers(*lstm_update(first, torch.zeros_like(first[:, :lstm.hidden_size])))
        return (*state, self.memory(features)) if self.cfg.regions else state

    def upper_layers(self, h0: torch.Tensor, c0: torch.Tensor,
                     state: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the LSTM's layers after the first, whose new (h0, c0) the caller computed itself;
        from `state`'s (h, c) [layers, N, H], or from zeros. Returns every layer's (h, c), stacked."""
        hs, cs, x = [h0], [c0], h0
        for layer in range(1, self.lstm.num_layers):
            prev = (state[0][layer], state[1][layer]) if state is not None else (torch.zeros_like(x),) * 2
            x, c = torch.lstm_cell(x, prev, *(getattr(self.lstm, f"{n}_l{layer}") for n in
                                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
            hs.append(x)
            cs.append(c)
        return torch.stack(hs), torch.stack(cs)

    def readout(self, hidden: torch.Tensor, state: State, record: list | None = None) -> torch.Tensor:
        """Next-word logits from the top layer's output [N, H]; `record` as for `attend`."""
        return self.logits(self.attend(hidden, state[2], record) if self.cfg.regions else hidden)

    def step(self, tokens: torch.Tensor, state: State, record: list | None = None) -> tuple[torch.Tensor, State]:
        """Log-probabilities of the next word for each sequence, given its last token; `record` as for `attend`."""
        x = self.word_embed(tokens)
        out, (h, c) = self.lstm(x.unsqueeze(1), state[:2])
        return F.log_softmax(self.readout(out.squeeze(1), state, record), dim=-1), (h, c, *state[2:])


class Ensemble(nn.Module):
    """Decoders trained alike from different seeds that vote on each next word, as the NIC paper's
    best results did. Next-word probabilities are averaged; the members' LSTM states are stacked along
    the layer axis and their region memories side by side along the feature axis, so decoding loops select
    and prune rows of one state exactly as for one model.
    """

    def __init__(self, members: list[ShowAndTell], split_features: bool = False):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one decoder")
        first = members[0].cfg
        for m in members[1:]:
            if (m.cfg.vocab_size, m.cfg.feature_dim, m.cfg.hidden_dim) != (first.vocab_size, first.feature_dim,
                                                                           first.hidden_dim):
                raise ValueError("ensemble members must share vocabulary, feature and hidden sizes")
            if m.cfg.regions != first.regions:
                raise ValueError("ensemble members must all attend to the same regions, or none")
        self.members = nn.ModuleList(members)
        self.cfg = first
        # each member's own features side by side (members fine-tuned their encoder's top: SharedTrunk)
        self.split_features = split_features
        self.feature_dim = first.feature_dim * (len(members) if split_features else 1)

    def _stack(self, states: list[State]) -> State:
        hc = torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states])
        return (*hc, torch.cat([s[2] for s in states], -1)) if self.cfg.regions else hc

    def init_state(self, features: torch.Tensor) -> State:
        parts = features.chunk(len(self.members), -1) if self.split_features else [features] * len(self.members)
        return self._stack([m.init_state(f) for m, f in zip(self.members, parts)])

    def step(self, tokens: torch.Tensor, state: State, member_step=None,
             record: list | None = None) -> tuple[torch.Tensor, State]:
        """Average of the members' next-word probabilities, as log-probabilities. `member_step(member,
        tokens, state, record)` replaces `member.step` (decoding passes its faster eval-mode step); `record`
        gets each member's `attention_record`, in member order."""
        sizes = [m.cfg.num_layers for m in self.members]
        parts = [state[0].split(sizes), state[1].split(sizes)]
        if self.cfg.regions:
            parts.append(state[2].split([m.memory_dim for m in self.members], -1))
        outs = [member_step(m, tokens, s, record) if member_step else m.step(tokens, s, record)
                for m, s in zip(self.members, zip(*parts))]
        logp = torch.logsumexp(torch.stack([o[0] for o in outs]), dim=0) - math.log(len(outs))
        return logp, self._stack([o[1] for o in outs])


Decoder = ShowAndTell | Ensemble
