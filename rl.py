"""
rl.py: multi-environment reinforcement learning from verifiable rewards with GRPO, on the chat model
that SFT made (config/sft.py). Read rollout.py and data/envs.py first.

    python rl.py                                  # the nano recipe: out-sft/ -> out-rl/
    python rl.py --envs=math --out_dir=out-rl-math   # one environment alone
    torchrun --standalone --nproc_per_node=8 rl.py   # the prompts of a step split over the ranks (DDP)

Nemotron 3 (Nano, Super) trains with RL over many environments at once (math, code, instruction
following, tool use, long context), since RL on one alone regresses the others; it drops prompts the
policy always solves (a curriculum), has a low-effort mode whose reward also counts the tokens spent,
and controls the reasoning budget. One step here:
  1) draw prompts_per_step tasks, each from an environment picked by --env_weights, with its
     conditions: reasoning on (--think_frac) or off; with reasoning on, a stated thinking budget B on
     --budget_frac of them; low effort on --low_effort_frac (rollout.py puts them in the system turn);
  2) roll out a group of G = group_size episodes per prompt with the current policy (rollout.py);
  3) reward r_i: the verifier's score; -budget_penalty if the thinking ran past a stated budget; in
     low effort, minus low_effort_lambda times the tokens spent;
  4) GRPO's advantages (DeepSeekMath, arXiv:2402.03300), per group: A_i = (r_i - mean r) / (std r + eps);
  5) the curriculum filter: a group whose rewards are all equal (all solved, or all failed) has A = 0
     and teaches nothing: dropped, and counted;
  6) the clipped policy-ratio loss with token-level normalisation (DAPO, arXiv:2503.14476), over the
     tokens o_t the policy sampled (rollout.py's mask), minibatch by minibatch:
        L = -(1 / sum_i |o_i|) sum_i sum_t [min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta KL_t]
     rho_t = pi_theta(o_t) / pi_old(o_t) (pi_old: the policy that sampled, its log-probabilities taken
     before the first update), KL_t = exp(q) - q - 1 with q = log pi_ref(o_t) - log pi_theta(o_t)
     (Schulman's k3 estimator) to the frozen starting policy, beta = kl_coef (0: no reference kept).
Tasks are a function of (seed, step) and every episode samples from its own seed, so N ranks see the
prompts one process would (whole groups per rank) and the same samples up to batch numerics.
"""
import copy, math, os, random, shutil, time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, append_log, check_out_dir, git_commit, load_for_inference, save_checkpoint
from data.chat import BUDGETS
from data.envs import HELDOUT, MAX_TURNS, env_names, make
from data.tokenizer import DataError, saved_config
from parallel import processes, shutdown
from rollout import Episode, advantages, evaluate, grpo_loss, group_filter, mean, run_episodes, shaped, token_logprobs

# -----------------------------------------------------------------------------
# default config: the nano recipe, minutes on a 2-core CPU
init_from = 'out-sft'           # the SFT checkpoint (python train.py config/sft.py writes out-sft/)
out_dir = 'out-rl'              # checkpoints (ckpt.pt, best.pt: the best held-out accuracy) and log.jsonl
envs = 'math,code,instruct,tools'  # comma-separated environments of data/envs.py, mixed in every step
env_weights = ''                # comma-separated weights, one per environment ('': equal)
steps = 60                      # RL steps
prompts_per_step = 8            # tasks per step, over all ranks
group_size = 8                  # G: episodes per task
max_new_tokens = 256            # tokens per assistant turn
max_turns = MAX_TURNS           # assistant turns per episode (tool calls in between)
max_len = 0                     # tokens of a whole episode (0: the block_size the checkpoint trained at)
temperature = 1.0               # sampling temperature of the rollouts
learning_rate = 1e-4            # AdamW, constant
weight_decay = 0.0
grad_clip = 1.0                 # clip the global gradient norm at this value (0: off)
clip_eps = 0.2                  # the policy-ratio clip
kl_coef = 0.0                   # beta: weight of the KL to the starting policy (0: none, no reference kept)
minibatches = 2                 # optimizer steps per RL step, over the step's episodes
think_frac = 0.5                # share of prompts with reasoning on (the rest off)
budget_frac = 0.3               # share of the reasoning-on prompts that state a thinking budget
budgets = ','.join(map(str, BUDGETS))  # the budgets (tokens) they state: 32,64,128
budget_penalty = 0.0            # reward of a thinking past its budget: -budget_penalty (0: as a wrong answer)
low_effort_frac = 0.1           # share of prompts in low-effort mode
low_effort_lambda = 0.002       # its reward: correctness - lambda * tokens spent
filter_groups = True            # the curriculum filter: drop groups whose rewards are all equal
eval_interval = 20              # held-out accuracy (greedy, reasoning on) and a checkpoint every this many steps
eval_tasks = 16                 # held-out tasks per environment at each evaluation
seed = 1337
device = 'auto'                 # 'auto' (cuda, else mps, else cpu), or e.g. 'cpu', 'cuda:1'
compile = False                 # the rollouts' one-token step through torch.compile (generate.py)
overwrite = False               # a fresh run may replace the checkpoints already in out_dir
config_ranges = {k: '[1, inf)' for k in ('steps', 'prompts_per_step', 'group_size', 'max_new_tokens', 'max_turns',
                                         'minibatches', 'eval_interval', 'eval_tasks')}
config_ranges.update({k: '[0, 1]' for k in ('think_frac', 'budget_frac', 'low_effort_frac')})
config_ranges.update({k: '[0, inf)' for k in ('max_len', 'temperature', 'learning_rate', 'weight_decay', 'grad_clip',
                                              'kl_coef', 'low_effort_lambda', 'budget_penalty', 'seed')},
                     clip_eps='(0, 1)')
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # and die()
config = {k: globals()[k] for k in config_keys}

try:
    env_list = env_names(envs)
except ValueError as e:
    die(str(e), 2)
try:
    weights = [float(w) for w in env_weights.split(',')] if env_weights else [1.0] * len(env_list)
    budget_list = [int(b) for b in budgets.split(',')] if budget_frac > 0 else []
except ValueError:
    die(f"--env_weights={env_weights!r} and --budgets={budgets!r} must be comma-separated numbers", 2)
if len(weights) != len(env_list) or min(weights) < 0 or sum(weights) <= 0:
    die(f"--env_weights={env_weights!r}: one weight >= 0 per environment ({len(env_list)}), not all 0", 2)
if any(b < 1 for b in budget_list):
    die(f"--budgets={budgets!r}: budgets are token counts >= 1", 2)

# -----------------------------------------------------------------------------
# processes, the policy, its tokenizer
try:
    ddp, rank, _, world, device = processes(device)
except ValueError as e:
    die(str(e), 2)
master = rank == 0
print0 = print if master else lambda *args, **kwargs: None
if not os.path.exists(init_from):
    hint = " (python data/sft/prepare.py && python train.py config/sft.py makes it)" if init_from == 'out-sft' else ""
    die(f"--init_from={init_from}: no such checkpoint{hint}", 2)
try:
    check_out_dir(out_dir, overwrite)
    model, tokenizer = load_for_inference(init_from, torch.float32, device)
except (CheckpointError, DataError) as e:
    die(str(e), 2)
if tokenizer.eot is None:
    die(f"{init_from}: its tokenizer has no end-of-text token, which ends a chat turn (fine-tune on data/sft first)", 2)
max_len = max_len or saved_config(init_from).get('block_size') or 512
reference = copy.deepcopy(model).requires_grad_(False) if kl_coef > 0 else None
model.train()
policy = DDP(model) if ddp else model  # the loss runs through DDP (gradients averaged); rollouts use model
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
print0(f"policy {init_from}: {model.num_params() / 1e6:.2f}M parameters; envs {', '.join(env_list)}; "
       f"{prompts_per_step} prompts x {group_size} samples per step over {world} rank(s); "
       f"episodes of <= {max_len} tokens")

# -----------------------------------------------------------------------------
# one step's pieces (the maths are rollout.py's)


def draw(step):
    """This step's prompts: (env, task seed, reasoning, budget, low effort), a function of (seed, step)."""
    rng = random.Random(seed * 1_000_003 + step)
    specs = []
    for _ in range(prompts_per_step):
        env = rng.choices(env_list, weights)[0]
        task_seed = rng.randrange(HELDOUT)  # the training split
        reasoning = 'on' if rng.random() < think_frac else 'off'
        budget = rng.choice(budget_list) if reasoning == 'on' and budget_list and rng.random() < budget_frac else None
        specs.append((env, task_seed, reasoning, budget, rng.random() < low_effort_frac))
    return specs


def padded(episodes):
    """(tokens (B, T), mask (B, T-1) over the predicted positions) of the episodes, right-padded."""
    T = max(len(ep.tokens) for ep in episodes)
    tokens = torch.zeros(len(episodes), T, dtype=torch.long)
    mask = torch.zeros(len(episodes), T)
    for i, ep in enumerate(episodes):
        tokens[i, :len(ep.tokens)] = torch.tensor(ep.tokens)
        mask[i, :len(ep.mask)] = torch.tensor(ep.mask, dtype=torch.float)
    return tokens.to(device), mask[:, 1:].to(device)


def all_sum(values):
    """values (a list of numbers) summed over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t)
    return t.tolist()


def save(step, best, scores):
    state = {'model_config': model.config.to_dict(), 'config': {**saved_config(init_from), **config},
             'iter_num': step, 'best_val_loss': -scores.get('mean', 0.0), 'best_step': step, 'scores': scores}
    save_checkpoint(out_dir, state, model.state_dict(), optimizer.state_dict(), best)


def held_out():
    """Mean held-out accuracy per environment, greedy, reasoning on (rank 0)."""
    model.eval()
    scores = evaluate(model, tokenizer, env_list, eval_tasks, tokenizer.eot, 'on', None, max_new_tokens, max_turns,
                      max_len, compile=compile)
    model.train()
    acc = {env: s['accuracy'] for env, s in scores.items()}
    return {**acc, 'mean': mean(acc.values())}


# -----------------------------------------------------------------------------
# the loop
if master:
    meta = os.path.join(init_from if os.path.isdir(init_from) else os.path.dirname(init_from), 'meta.json')
    if os.path.isfile(meta):  # the tokenizer travels with the run
        shutil.copyfile(meta, os.path.join(out_dir, 'meta.json'))
    append_log(out_dir, {'config': config, 'init_from': init_from, 'git': git_commit(), 'world_size': world,
                         'time': time.strftime('%Y-%m-%d %H:%M:%S')}, fresh=True)
best_score, best_step = -math.inf, 0
if master:
    scores = held_out()
    print0("step 0 held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    append_log(out_dir, {'step': 0, 'heldout': scores})
    best_score = scores['mean']
    save(0, True, scores)  # best.pt is the starting policy until a step beats it
pbar = tqdm(total=steps, disable=not master, dynamic_ncols=True)
for step in range(1, steps + 1):
    t0 = time.time()
    # 1-2) this rank's prompts (whole groups) and their rollouts
    specs = list(enumerate(draw(step)))[rank::world]
    base = (seed * 1_000_003 + step) * 10_007  # episode g of prompt i samples from seed base + i G + g
    episodes = [Episode(make(env, s), reasoning, budget, low, seed=base + i * group_size + g)
                for i, (env, s, reasoning, budget, low) in specs for g in range(group_size)]
    model.eval()
    run_episodes(model, tokenizer, episodes, max_new_tokens, tokenizer.eot, temperature, max_turns=max_turns,
                 max_len=max_len, compile=compile)
    model.train()
    # 3-5) rewards, advantages, the filter
    groups = [episodes[k:k + group_size] for k in range(0, len(episodes), group_size)]  # specs' order
    rewards = torch.tensor([[shaped(ep, low_effort_lambda, budget_penalty) for ep in grp] for grp in groups])
    rewards = rewards.view(-1, group_size)  # (groups, G), also when no group ran
    adv = advantages(rewards)  # (groups, G)
    keep = (group_filter(rewards) if filter_groups else torch.ones(len(groups), dtype=torch.bool)).tolist()
    solved = sum(all(ep.reward == 1 for ep in grp) for grp in groups)
    failed = sum(all(ep.reward == 0 for ep in grp) for grp in groups)
    # 6) the loss over minibatches of whole groups, each prompt's minibatch drawn from (seed, step) alone,
    # so any number of ranks forms the same minibatches; a rank with none of a minibatch's groups still
    # takes part in its gradient all-reduce (a zero loss)
    perm = torch.randperm(prompts_per_step, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    slot = perm.argsort() % minibatches  # (prompts,): each prompt's minibatch
    chunks = [[(grp, a) for (i, _), grp, a, k in zip(specs, groups, adv, keep) if k and slot[i] == j]
              for j in range(minibatches)]
    batches = [padded([ep for grp, _ in chunk for ep in grp]) if chunk else None for chunk in chunks]
    with torch.no_grad():  # pi_old: the policy that sampled, before this step's first update; pi_ref
        old = [(token_logprobs(model, b[0]), token_logprobs(reference, b[0]) if reference else None) if b else None
               for b in batches]
    stats = {'kl': 0.0, 'clipped': 0.0, 'tokens': 0.0}
    for chunk, batch, (old_logp, ref_logp) in zip(chunks, batches, [o or (None, None) for o in old]):
        my_tokens = batch[1].sum().item() if batch else 0  # this rank's sampled tokens in the minibatch
        n_tokens = all_sum([my_tokens])[0]
        if n_tokens == 0:
            continue  # no rank has a sampled token in this minibatch
        if batch:
            tokens, mask = batch
            loss, kl, clipped = grpo_loss(token_logprobs(policy, tokens), old_logp,
                                          torch.cat([a for _, a in chunk]).to(device), mask, n_tokens / world,
                                          clip_eps, kl_coef, ref_logp)
        else:  # a forward on one token, times 0, so that DDP's gradient all-reduce still meets every rank
            dummy = torch.zeros(1, 2, dtype=torch.long, device=device)
            loss, kl, clipped = token_logprobs(policy, dummy).sum() * 0, 0, 0
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats['kl'] += float(kl)
        stats['clipped'] += float(clipped)
        stats['tokens'] += my_tokens
    # logs: per environment, summed over the ranks
    record = {'step': step}
    for env in env_list:
        mine = [ep for ep in episodes if ep.task.env == env]
        on = [ep for ep in mine if ep.reasoning == 'on' and not ep.skipped]
        n, r, acc, think, n_on, skipped, errors = all_sum([
            len(mine), sum(shaped(ep, low_effort_lambda, budget_penalty) for ep in mine), sum(ep.reward for ep in mine),
            sum(ep.thinking for ep in on),
            len(on), sum(ep.skipped == 'context' for ep in mine), sum(bool(ep.error) for ep in mine)])
        if n:
            record[env] = {'reward': r / n, 'accuracy': acc / n, 'thinking': think / n_on if n_on else None,
                           'skipped': int(skipped), 'verifier_errors': int(errors)}
        for ep in mine:
            if ep.error:
                print(f"rank {rank} step {step}: the {env} verifier raised {ep.error}; the sample scores 0")
    n_groups, n_solved, n_failed, n_kept, kl, clipped, tokens = all_sum(
        [len(groups), solved, failed, sum(keep), stats['kl'], stats['clipped'], stats['tokens']])
    record.update(filtered=1 - n_kept / n_groups, all_solved=int(n_solved), all_failed=int(n_failed),
                  kl=kl / tokens if tokens and reference is not None else None,
                  clipped=clipped / tokens if tokens else 0.0, time=time.time() - t0)
    if master:
        append_log(out_dir, record)
        pbar.update(1)
        pbar.set_postfix_str(' '.join(f"{env} {record[env]['reward']:.2f}" for env in env_list if env in record)
                             + f" | filtered {record['filtered']:.0%}")
    if step % eval_interval == 0 or step == steps:
        if master:
            scores = held_out()
            best = scores['mean'] > best_score
            if best:
                best_score, best_step = scores['mean'], step
            tqdm.write(f"step {step} held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                       + (f"; {n_groups - n_kept:.0f} of {n_groups:.0f} groups filtered "
                          f"({n_solved:.0f} all solved, {n_failed:.0f} all failed)"))
            append_log(out_dir, {'step': step, 'heldout': scores})
            save(step, best, scores)
        if ddp:
            dist.barrier()
pbar.close()
print0(f"done: {out_dir}/ckpt.pt; the best held-out accuracy, {best_score:.3f} at step {best_step}, "
       f"in {out_dir}/best.pt")
if ddp:
    shutdown(None)  # barrier, destroy, and exit before a gloo thread can abort the interpreter's finalization
