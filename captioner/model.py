"""The Show and Tell decoder (Vinyals et al. 2015) in one file.

The image embedding is the LSTM's first input only (x_{-1} = W_i CNN(I)); then each word is embedded
and fed in turn (teacher forcing), and a linear layer over the LSTM state scores the next word.
Loss is cross-entropy over real tokens only: outputs are packed, so padding costs neither compute nor loss.

With `regions` > 0 (encoder pool "regions") the features also hold a grid of region vectors, and each
output attends over them before scoring words (Luong et al. 2015's attention on top of the LSTM output):
the LSTM still runs over the whole sentence in one call, so training costs about what it did.
With `att_feed` the context each output read is also the LSTM's next input beside the word (Luong et al.'s
input feeding; Show, Attend and Tell's z_t): the LSTM then knows what it has already looked at, but training
must unroll it one step at a time. Scheduled sampling (`forward`'s `sample_prob`) uses the same unroll.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .vocab import SPECIALS

State = tuple[torch.Tensor, ...]  # (h, c) or, with regions, (h, c, memory)
ROWS = 256
NO_CONCEPT = len(SPECIALS)  # ids below this (pad, start, end, unk) are not concepts


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
    att_positions: bool = False  # a learned key per grid cell, so attention can tell where a region is
    att_feed: bool = False  # the attended context [att_dim] is the next step's LSTM input too
    concepts: bool = False  # the image step also reads the words the image's captions are likely to hold
    tie_words: bool = False  # the output layer scores words against their input embeddings (Press & Wolf 2017)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ShowAndTell(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.regions < 0 or cfg.att_dim < 1 or not 0 <= cfg.att_dropout < 1:
            raise ValueError(f"bad attention settings: regions {cfg.regions}, att_dim {cfg.att_dim}, "
                             f"att_dropout {cfg.att_dropout}")
        if cfg.att_feed and (not cfg.regions or cfg.num_layers != 1):
            raise ValueError("att_feed needs regions to attend over and a one-layer LSTM")
        channels = cfg.feature_dim // (cfg.regions + 1)
        if channels * (cfg.regions + 1) != cfg.feature_dim:
            raise ValueError(f"{cfg.feature_dim}-d features do not split into {cfg.regions + 1} equal vectors")
        self.image_embed = nn.Linear(channels, cfg.embed_dim)
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.feed_dim = cfg.att_dim if cfg.att_feed else 0
        self.lstm = nn.LSTM(cfg.embed_dim + self.feed_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.tie_words:  # hidden -> embedding width, then the embeddings: H x E new weights instead of H x V
            self.out_proj = nn.Linear(cfg.hidden_dim, cfg.embed_dim, bias=False)
            self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
            with torch.no_grad():  # N(0, 1) rows would start the logits at a spread of about 8
                nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)[0].zero_()
        else:
            self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        if cfg.regions:
            self.att_key = nn.Linear(channels, cfg.att_dim)
            self.att_value = nn.Linear(channels, cfg.att_dim)
            self.att_query = nn.Linear(cfg.hidden_dim, cfg.att_dim, bias=False)
            self.att_out = nn.Linear(cfg.att_dim, cfg.hidden_dim, bias=False)
            if cfg.att_positions:
                self.att_pos = nn.Parameter(torch.zeros(cfg.regions, 1, cfg.att_dim))
        if cfg.concepts:
            self.concept_bias = nn.Parameter(torch.full((cfg.vocab_size - NO_CONCEPT,), -4.0))  # a word in ~2% of images

    def concept_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Whether each word (specials aside) is in the image's captions, as logits [B, V - 4], read from its
        embedding `image` (image_embed's output) against the word embeddings: no weights of its own beyond a
        bias per word, and trained (train.py's concept_weight) as a bag of words over all its captions."""
        return image @ self.word_embed.weight[NO_CONCEPT:].t() + self.concept_bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.tie_words:
            return F.linear(self.out_proj(hidden), self.word_embed.weight, self.out_bias)
        return self.out(hidden)

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer as one [V, H] weight and its bias, for decoding's precomputed step; tied, the
        embeddings times the projection, folded once so that a step costs what an untied one does."""
        if self.cfg.tie_words:
            return self.word_embed.weight @ self.out_proj.weight, self.out_bias
        return self.out.weight, self.out.bias

    def image_vector(self, features: torch.Tensor) -> torch.Tensor:
        """The global feature's embedding, before concepts and dropout."""
        return self.image_embed(features[:, : self.image_embed.in_features])

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        image = self.image_vector(features)
        if self.cfg.concepts:  # plus the expected embedding of the words the image's captions hold
            p = torch.sigmoid(self.concept_logits(image))
            image = image + p @ self.word_embed.weight[NO_CONCEPT:] / (1 + p.sum(-1, keepdim=True))
        return self.dropout(image)

    def memory(self, features: torch.Tensor) -> torch.Tensor:
        """The image's regions as keys and values in the hidden state's space, [R, B, 2H] (rows on axis 1, as
        in the LSTM state). The query and output projections are folded into them, once per image:
        (W_q h).k = h.(W_q^T k) and W_o(sum a v) = sum a W_o v, so a decoding step only takes dot products.
        With att_feed the unprojected values follow, [R, B, 2H + att_dim], for the context fed back."""
        regions = features[:, self.image_embed.in_features:].unflatten(1, (self.cfg.regions, -1)).transpose(0, 1)
        regions = F.dropout(regions, self.cfg.att_dropout, self.training)
        keys = self.att_key(regions)
        if self.cfg.att_positions:
            keys = keys + self.att_pos
        keys = keys @ self.att_query.weight / math.sqrt(self.cfg.att_dim)
        values = self.dropout(self.att_value(regions))
        parts = [keys, self.att_out(values)] + ([values] if self.feed_dim else [])
        return torch.cat(parts, -1)

    @property
    def memory_dim(self) -> int:
        """Width of `memory`'s rows: keys and output values [H each], then the fed-back values."""
        return 2 * self.cfg.hidden_dim + self.feed_dim

    def _read(self, hidden: torch.Tensor, memory: torch.Tensor, values: slice) -> torch.Tensor:
        """What hidden reads from its image's regions: `values` picks the output values or the fed-back ones
        from memory's rows. memory [R, M, .] holds M images; hidden's rows are theirs in order, the same
        number each ([M, T, H] in training, [M*K, H] for K beams)."""
        H = hidden.shape[-1]
        mem = memory.transpose(0, 1)  # [M, R, .]
        keys, values = mem[..., :H], mem[..., values]
        h = hidden.reshape(keys.shape[0], -1, H)
        weights = torch.softmax(h @ keys.transpose(1, 2), -1)
        return (weights @ values).view(*hidden.shape[:-1], values.shape[-1])

    def attend(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """hidden plus what it reads from its image's regions."""
        H = self.cfg.hidden_dim
        return hidden + self._read(hidden, memory, slice(H, 2 * H))

    def context(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The att_dim-wide context hidden reads, the next step's LSTM input beside the word (att_feed)."""
        return self._read(hidden, memory, slice(2 * self.cfg.hidden_dim, None))

    def _unroll(self, packed: PackedSequence, memory: torch.Tensor | None, sample_prob: float = 0.0) -> PackedSequence:
        """The one-layer LSTM over a packed batch one step at a time, for what one call cannot do: each
        step's input completed by the context the previous output read (att_feed), and scheduled sampling
        (Bengio et al. 2015): with probability `sample_prob` a word's input is a word drawn from the model's
        own previous prediction instead of the reference's. Gates are nn.LSTM's (i, f, g, o); the words' part
        of the input projection is one matrix product for the whole batch, as nn.LSTM does it."""
        lstm, E = self.lstm, self.cfg.embed_dim
        w_word, w_feed = lstm.weight_ih_l0[:, :E], lstm.weight_ih_l0[:, E:]
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
            if t and self.feed_dim:  # the image step has nothing to feed back
                gates = gates + F.linear(self.context(h, memory[:, :n]), w_feed)
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
        unroll = self.feed_dim or sample_prob
        out = self._unroll(packed, memory, sample_prob) if unroll else self.lstm(packed)[0]
        # Drop the image step's output: outputs after <start>..wn predict w1..<end>.
        hidden, _ = pad_packed_sequence(out, batch_first=True)
        hidden = hidden[:, 1:]
        if self.cfg.regions:
            hidden = self.attend(hidden, memory)
        hidden = pack_padded_sequence(hidden, lengths - 1, batch_first=True, enforce_sorted=False).data
        targets = pack_padded_sequence(captions[:, 1:], lengths - 1, batch_first=True, enforce_sorted=False).data
        # Round the token count up to a multiple of ROWS: with --amp every new shape makes oneDNN build and
        # keep another bf16 matmul, and the process grew to 2.6 GB in an epoch (2.1-2.2 GB so; eval/RESULTS.md).
        n = hidden.shape[0]
        return self.logits(self.dropout(F.pad(hidden, (0, 0, 0, -n % ROWS))))[:n], targets

    def loss(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
             label_smoothing: float = 0.0, sample_prob: float = 0.0, bags: torch.Tensor | None = None,
             concept_weight: float = 0.0) -> torch.Tensor:
        """Mean token cross-entropy; with `bags` ([B, V - 4]: 1 where a word is in any caption of the row's
        image), plus concept_weight x the concepts' binary cross-entropy per word present."""
        logits, targets = self(features, captions, lengths, sample_prob)
        loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        if bags is not None and concept_weight:
            loss = loss + concept_weight * self.concept_loss(features, bags)
        return loss

    def concept_loss(self, features: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        logits = self.concept_logits(self.image_vector(features))
        return F.binary_cross_entropy_with_logits(logits.float(), bags, reduction="sum") / bags.sum().clamp(min=1)

    # --- step-by-step interface used by greedy and beam search ---
    def init_state(self, features: torch.Tensor) -> State:
        """LSTM state after reading the image (the paper's x_{-1} step); with regions, their memory follows
        (h, c), one row per image (beam search gives each image K rows of h and c, but one of memory)."""
        image = self.embed_image(features)
        if self.feed_dim:
            image = F.pad(image, (0, self.feed_dim))  # the image step has no context to feed back
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

    def readout(self, hidden: torch.Tensor, state: State) -> torch.Tensor:
        """Next-word logits from the top layer's output [N, H]."""
        return self.logits(self.attend(hidden, state[2]) if self.cfg.regions else hidden)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Log-probabilities of the next word for each sequence, given its last token."""
        x = self.word_embed(tokens)
        if self.feed_dim:
            x = torch.cat([x, self.context(state[0][-1], state[2])], -1)
        out, (h, c) = self.lstm(x.unsqueeze(1), state[:2])
        return F.log_softmax(self.readout(out.squeeze(1), state), dim=-1), (h, c, *state[2:])


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

    def step(self, tokens: torch.Tensor, state: State, member_step=None) -> tuple[torch.Tensor, State]:
        """Average of the members' next-word probabilities, as log-probabilities. `member_step(member,
        tokens, state)` replaces `member.step` (decoding passes its faster eval-mode step)."""
        sizes = [m.cfg.num_layers for m in self.members]
        parts = [state[0].split(sizes), state[1].split(sizes)]
        if self.cfg.regions:
            parts.append(state[2].split([m.memory_dim for m in self.members], -1))
        outs = [member_step(m, tokens, s) if member_step else m.step(tokens, s)
                for m, s in zip(self.members, zip(*parts))]
        logp = torch.logsumexp(torch.stack([o[0] for o in outs]), dim=0) - math.log(len(outs))
        return logp, self._stack([o[1] for o in outs])


Decoder = ShowAndTell | Ensemble
