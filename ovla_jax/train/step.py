"""The train step: loss on the action tokens + EOS, metrics, one jitted sharded update.

Logits are computed only where a label exists (8 positions per example, not ~280): the hidden states
of the labelled positions are gathered before the lm_head, which dominates small-LLM cost. Loss and
logits are fp32 whatever the compute dtype.

Axis letters: B batch, L text tokens, P patches, K labelled positions, D width, V vocab, N datasets.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ovla_jax import actions as A
from ovla_jax.data.batch import IGNORE
from ovla_jax import quantize as Q
from ovla_jax.models.openvla import OpenVLA
from ovla_jax.models.param_init import rescale_init
from ovla_jax.train.frozen import FrozenForm, apply_form, combine, form_shardings, partition


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs on device: ``rng`` (uint32[2]) seeds dropout per step."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def label_positions(labels, num_patches: int, num_labels: int):
    """labels int[B, L] (text layout) -> (index int[B, K] of the hidden state predicting each label in the
    multimodal sequence, targets int[B, K], valid bool[B, K]). Hidden i predicts token i + 1."""
    b = labels.shape[0]
    mm = jnp.concatenate([labels[:, :1], jnp.full((b, num_patches), IGNORE, labels.dtype), labels[:, 1:]], axis=1)
    targets_all = mm[:, 1:]
    valid_all = targets_all != IGNORE
    index = jnp.argsort(~valid_all, axis=1, stable=True)[:, :num_labels]
    targets = jnp.take_along_axis(targets_all, index, axis=1)
    valid = jnp.take_along_axis(valid_all, index, axis=1)
    return index, jnp.where(valid, targets, 0), valid


def loss_and_metrics(params, model: OpenVLA, batch: dict, *, num_labels: int, num_datasets: int, rng=None):
    """Mean cross-entropy over the labelled tokens, plus accuracy / L1 on the action tokens, overall and
    per dataset (arrays [N] of sums and counts, so they average correctly across steps and hosts).
    ``rng`` (training only) drives dropout. Parallel (OFT) models: :func:`parallel_loss_and_metrics`."""
    cfg = model.config
    if cfg.parallel:
        return parallel_loss_and_metrics(params, model, batch, num_datasets=num_datasets, rng=rng)
    rngs = {"dropout": rng} if rng is not None else None
    hidden = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                         method=OpenVLA.hidden_states, rngs=rngs)
    index, targets, valid = label_positions(batch["labels"], cfg.num_patches, num_labels)
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
    logits = model.apply({"params": params}, picked, method=OpenVLA.logits)  # float32[B, K, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce = jnp.where(valid, ce, 0.0)
    loss = ce.sum() / jnp.maximum(valid.sum(), 1)

    vocab = cfg.tokenizer_vocab_size
    is_action = valid & A.is_action_token(targets, vocab, cfg.n_action_bins, xp=jnp)
    predicted = jnp.argmax(logits, axis=-1)
    correct = (predicted == targets) & is_action
    l1 = jnp.abs(A.decode_action_tokens(predicted, vocab, cfg.n_action_bins, xp=jnp)
                 - A.decode_action_tokens(targets, vocab, cfg.n_action_bins, xp=jnp))
    l1 = jnp.where(is_action, l1, 0.0)
    onehot = jax.nn.one_hot(batch.get("dataset_id", jnp.zeros(targets.shape[0], jnp.int32)), num_datasets)
    per_example = {"loss": ce.sum(1), "tokens": valid.sum(1), "correct": correct.sum(1),
                   "action_tokens": is_action.sum(1), "l1": l1.sum(1)}
    metrics = {f"{k}_sum": v.sum() for k, v in per_example.items()}
    metrics.update({f"per_dataset/{k}_sum": onehot.T @ v.astype(jnp.float32) for k, v in per_example.items()})
    metrics["loss"] = loss
    metrics["accuracy"] = correct.sum() / jnp.maximum(is_action.sum(), 1)
    metrics["l1"] = l1.sum() / jnp.maximum(is_action.sum(), 1)
    return loss, metrics


def parallel_loss_and_metrics(params, model: OpenVLA, batch: dict, *, num_datasets: int, rng=None):
    """OFT: one bidirectional pass; the states one before each action slot feed the head. ``l1``: mean
    absolute error on the normalized chunk; ``parallel-tokens``: cross-entropy on the slots' action tokens
    and the stop token. Chunk steps that ``action_mask`` marks (past the trajectory end, with the config's
    ``mask_past_end``) take no loss. Metrics: L1
    (of the head's or the argmax tokens' actions) overall, per action dim, per chunk step, per dataset."""
    from ovla_jax.models.openvla import gather_slots

    cfg = model.config
    rngs = {"dropout": rng} if rng is not None else None
    b, k, d = batch["actions"].shape
    hidden = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                         batch.get("proprio"), batch["action_slots"], method=OpenVLA.hidden_states, rngs=rngs)
    slots = gather_slots(hidden, batch["action_slots"], cfg)  # [B, K * D, H]
    step_mask = batch.get("action_mask", jnp.ones((b, k), bool)).astype(jnp.float32)  # [B, K]
    cell_mask = jnp.broadcast_to(step_mask[..., None], (b, k, d))
    vocab = cfg.tokenizer_vocab_size
    if cfg.action_head == "l1":
        predicted = model.apply({"params": params}, slots, method=OpenVLA.regress)  # [B, K, D]
        err = jnp.abs(predicted - batch["actions"]) * cell_mask
        loss = err.sum() / jnp.maximum(cell_mask.sum(), 1.0)
        correct = jnp.zeros((b,), jnp.float32)
        per_loss, labelled = err.sum((1, 2)), cell_mask.sum((1, 2))
    else:
        # The last slot's successor (the stop token) is predicted by the last slot's own state.
        stop_index = jnp.argmax(batch["action_slots"], axis=1) + cfg.num_prefix_embeddings + cfg.num_action_slots - 1
        last = jnp.take_along_axis(hidden, stop_index[:, None, None], axis=1)
        logits = model.apply({"params": params}, jnp.concatenate([slots, last], axis=1), method=OpenVLA.logits)
        targets = A.encode_actions(batch["actions"], vocab, cfg.n_action_bins, xp=jnp).reshape(b, k * d)
        stop_target = jnp.take_along_axis(batch["input_ids"], (stop_index - cfg.num_prefix_embeddings + 1)[:, None], axis=1)
        targets = jnp.concatenate([targets, stop_target.astype(jnp.int32)], axis=1)
        weights = jnp.concatenate([cell_mask.reshape(b, k * d), jnp.ones((b, 1))], axis=1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
        loss = ce.sum() / jnp.maximum(weights.sum(), 1.0)
        tokens = jnp.argmax(logits[:, :-1], axis=-1)
        predicted = A.decode_action_tokens(tokens, vocab, cfg.n_action_bins, xp=jnp).reshape(b, k, d)
        correct = ((tokens == targets[:, :-1]) * cell_mask.reshape(b, k * d)).sum(1)
        err = jnp.abs(predicted - batch["actions"]) * cell_mask
        per_loss, labelled = ce.sum(1), weights.sum(1)  # the stop token is a labelled token too
    onehot = jax.nn.one_hot(batch.get("dataset_id", jnp.zeros(b, jnp.int32)), num_datasets)
    per_example = {"loss": per_loss, "tokens": labelled, "correct": correct, "action_tokens": cell_mask.sum((1, 2)),
                   "l1": err.sum((1, 2))}
    metrics = {f"{key}_sum": v.sum() for key, v in per_example.items()}
    metrics.update({f"per_dataset/{key}_sum": onehot.T @ v.astype(jnp.float32) for key, v in per_example.items()})
    cells = jnp.maximum(cell_mask.sum(), 1.0)
    metrics["loss"] = loss
    metrics["accuracy"] = correct.sum() / cells
    metrics["l1"] = err.sum() / cells
    metrics["l1_dim_sum"], metrics["dim_count_sum"] = err.sum((0, 1)), cell_mask.sum((0, 1))  # [D]
    metrics["l1_step_sum"], metrics["step_count_sum"] = err.sum((0, 2)), cell_mask.sum((0, 2))  # [K]
    return loss, metrics


def train_step(state: TrainState, batch: dict, *, model: OpenVLA, tx, num_labels: int, num_datasets: int,
               trainable=None):
    """One update. ``trainable`` (a tree of bools like the params, None = all) marks what trains: the
    gradient is taken of the trainable subtree only, so frozen params (kept in low precision or
    quantized: ``ovla_jax.train.frozen``) get no weight gradients (a third of a full step's FLOPs, and
    memory), no optimizer state and no update; they pass through unchanged. ``tx`` acts on the
    trainable subtree."""
    loss_fn = partial(loss_and_metrics, model=model, num_labels=num_labels, num_datasets=num_datasets)
    train_params, frozen_params = partition(state.params, trainable)

    def of_trainable(params, **kwargs):
        return loss_fn(combine(params, frozen_params), **kwargs)

    grad_fn = jax.value_and_grad(of_trainable, has_aux=True)
    (_, metrics), grads = grad_fn(train_params, batch=batch, rng=jax.random.fold_in(state.rng, state.step))
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    train_params = optax.apply_updates(train_params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=combine(train_params, frozen_params), opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model: OpenVLA, num_labels: int, num_datasets: int):
    """Validation metrics (no dropout, no update)."""
    return loss_and_metrics(params, model, batch, num_labels=num_labels, num_datasets=num_datasets)[1]


def _overlay(base, loaded):
    """``base`` with every leaf that ``loaded`` has (same path) replaced: loaded weights + fresh adapters.
    Loaded leaves come in their final form (frozen ones cast or quantized by the loader)."""
    flat = flax.traverse_util.flatten_dict(base)
    new = flax.traverse_util.flatten_dict(loaded)
    unknown = sorted("/".join(k) for k in set(new) - set(flat))
    if unknown:
        raise ValueError(f"loaded params hold {len(unknown)} path(s) the model lacks: {unknown[:5]}")
    for k, v in new.items():
        want = jax.tree.map(lambda x: (x.shape, x.dtype), flat[k])
        if Q.is_quantized(v) or Q.is_quantized(flat[k]):
            if jax.tree.map(lambda x: (x.shape, x.dtype), v) != want:
                raise ValueError(f"loaded param {'/'.join(k)} is {type(v).__name__}; the model expects {want}")
            flat[k] = v
            continue
        if v.shape != flat[k].shape:
            raise ValueError(f"loaded param {'/'.join(k)} has shape {v.shape}; the model expects {flat[k].shape}")
        flat[k] = v.astype(flat[k].dtype)
    return flax.traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class Trainer:
    """Holds the model, optimizer and mesh; builds sharded state and the jitted step once."""

    model: OpenVLA
    tx: Any
    mesh: Any
    num_labels: int = 8  # 7 action tokens + EOS
    num_datasets: int = 1
    trainable: Any = None  # tree of bools like the params (optimizer.trainable_mask); None = all train
    init_scheme: str = "hf"  # how fresh params are scaled (ovla_jax.models.param_init); loaded ones keep theirs
    frozen_form: FrozenForm = FrozenForm()  # how frozen params are stored (ovla_jax.train.frozen)

    def state_shardings(self, abstract_state: TrainState, boxed_params):
        from ovla_jax import sharding

        param_sh = form_shardings(sharding.param_shardings(boxed_params, self.mesh), abstract_state.params)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # Optimizer moments (mu, nu, ...) mirror their params' shardings: a state leaf whose dict-key path
        # ends with a param's path takes that param's sharding; counts and other scalars are replicated.
        by_path = {path: sh for path, sh in flax.traverse_util.flatten_dict(param_sh).items()}

        def pick(key_path, leaf):
            keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
            for start in range(len(keys)):
                sh = by_path.get(keys[start:])
                if sh is not None and len(sh.spec) <= len(leaf.shape):
                    return sh
            return replicated

        opt_sh = jax.tree_util.tree_map_with_path(pick, abstract_state.opt_state)
        return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)

    def _boxed_init(self, rng, example_batch):
        pixels = jnp.zeros((1,) + tuple(example_batch["pixel_values"].shape[1:]), jnp.float32)
        ids = jnp.zeros((1,) + tuple(example_batch["input_ids"].shape[1:]), jnp.int32)
        return self.model.init(rng, pixels, ids)["params"]

    def abstract_state(self, rng, example_batch: dict):
        """(abstract TrainState, its shardings): shapes only, for restoring a checkpoint into shards."""
        boxed = jax.eval_shape(self._boxed_init, rng, example_batch)
        abstract = jax.eval_shape(lambda r: self._make_state(r, example_batch, None), rng)
        self.shardings = self.state_shardings(abstract, boxed)
        return abstract, self.shardings

    def _make_state(self, rng, example_batch, params):
        init_rng, state_rng = jax.random.split(rng)
        fresh = rescale_init(flax.linen.meta.unbox(self._boxed_init(init_rng, example_batch)), self.init_scheme)
        fresh = apply_form(fresh, self.trainable, self.frozen_form)
        # Loaded weights replace their fresh counterparts (XLA drops the unused random init); params
        # the checkpoint lacks (LoRA adapters) keep their init.
        params = fresh if params is None else _overlay(fresh, params)
        trainable, _ = partition(params, self.trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(trainable),
                          rng=state_rng)

    def init(self, rng, example_batch: dict, params=None) -> TrainState:
        """A TrainState created directly in its shards (nothing materialized on one device). ``params``
        (e.g. from the loader, already in their shards and final form) replace the init where given;
        device arrays are donated, so the state takes their buffers instead of copying them."""
        _, shardings = self.abstract_state(rng, example_batch)
        # (Host arrays cannot be donated, and jax 0.10 mis-aliases the outputs when asked to.)
        donate = params is not None and all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
        return jax.jit(lambda r, p: self._make_state(r, example_batch, p), out_shardings=shardings,
                       donate_argnums=1 if donate else ())(rng, params)

    def _on_mesh(self, fn):
        """``fn`` traced with the activation sharding rules over this mesh (see ``sharding.activation_rules``)."""
        from ovla_jax import sharding

        def traced(*args):
            with sharding.activation_rules(self.mesh):
                return fn(*args)

        return traced

    def compile_step(self, batch_sharding):
        step = partial(train_step, model=self.model, tx=self.tx, num_labels=self.num_labels,
                       num_datasets=self.num_datasets, trainable=self.trainable)
        self.step = jax.jit(self._on_mesh(step), in_shardings=(self.shardings, batch_sharding),
                            out_shardings=(self.shardings, None), donate_argnums=(0,),
                            compiler_options=self._compiler_options())
        return self.step

    def _compiler_options(self):
        from ovla_jax.compile_options import weight_loop_options

        return weight_loop_options(self.mesh.devices.flat[0].platform)

    def compile_eval(self, batch_sharding):
        fn = partial(eval_step, model=self.model, num_labels=self.num_labels, num_datasets=self.num_datasets)
        self.eval = jax.jit(self._on_mesh(fn), in_shardings=(self.shardings.params, batch_sharding),
                            compiler_options=self._compiler_options())
        return self.eval
