"""Log-likelihood throughput of the ``proxjax`` lm-eval backend against lm-eval's own ``hf`` backend (PyTorch), in one
run on the same requests: the bundled offline task ``lee_last_word`` (LAMBADA-style last word of held-out news
passages) on SmolLM2-135M, float32, CPU.

Reports requests/s of each backend, the proxjax backend once cold (its compiles included) and once warm, the number
of shapes it compiled, and the largest difference between the two backends' log-likelihoods.

  python benchmarks/lm_eval_speed.py [--requests 96] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--requests", type=int, default=96, help="first N requests of lee_last_word (417 in all)")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--max-length", type=int, default=2048)
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  args = ap.parse_args()

  from lm_eval.tasks import TaskManager, get_task_dict

  from proxjax.data.tasks import task_dir
  from proxjax.models.convert import default_model_dir
  from proxjax.pipeline.harness import ProxjaxLM

  model_dir = str(default_model_dir())
  task = get_task_dict(["lee_last_word"], TaskManager(include_path=str(task_dir()), include_defaults=False))
  task = task["lee_last_word"]
  task.build_all_requests(rank=0, world_size=1, limit=args.requests)
  reqs = task.instances
  ours = ProxjaxLM(pretrained=model_dir, dtype="float32", batch_size=args.batch_size, max_length=args.max_length)
  n_tok = [len(ours.tok_encode(r.args[0] + r.args[1])) for r in reqs]
  print(f"{len(reqs)} requests of lee_last_word, {min(n_tok)}-{max(n_tok)} tokens (mean {sum(n_tok) / len(n_tok):.0f}), "
        f"batch size {args.batch_size}")

  t = time.perf_counter()
  a = ours.loglikelihood(reqs, disable_tqdm=True)
  cold = time.perf_counter() - t
  t = time.perf_counter()
  ours.loglikelihood(reqs, disable_tqdm=True)
  warm = time.perf_counter() - t

  import torch
  from lm_eval.models.huggingface import HFLM
  if args.threads:
    torch.set_num_threads(args.threads)
  ref = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=args.batch_size,
             max_length=args.max_length)
  t = time.perf_counter()
  b = ref.loglikelihood(reqs, disable_tqdm=True)
  hf_time = time.perf_counter() - t

  n = len(reqs)
  diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
  greedy = sum(x[1] == y[1] for x, y in zip(a, b))
  print(f"proxjax cold (with {ours.compiles} compiles): {cold:.1f} s, {n / cold:.2f} requests/s")
  print(f"proxjax warm:                      {warm:.1f} s, {n / warm:.2f} requests/s")
  print(f"hf (torch {torch.__version__}, {torch.get_num_threads()} threads): {hf_time:.1f} s, "
        f"{n / hf_time:.2f} requests/s")
  print(f"ratio proxjax/hf: cold {hf_time / cold:.2f}x, warm {hf_time / warm:.2f}x; max |Δ loglikelihood| "
        f"{diff:.2e}, is_greedy equal {greedy}/{n}")


if __name__ == "__main__":
  main()
