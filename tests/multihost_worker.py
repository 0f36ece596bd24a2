"""One process of a 2-process run for tests/test_multihost.py (and a runnable example of multi-host use):
    python tests/multihost_worker.py PROCESS_ID COORDINATOR_ADDRESS MODEL OUT_JSON
4 virtual CPU devices per process; the model spans both processes' 8 devices (tensor 4 x pipeline 2, so the
pipeline stages sit on different processes). Process 0 generates and writes the tokens; process 1 follows.
Importing this module (for its constants) changes nothing: the device count is set only when run."""
import json
import os
import sys

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, num_kv_blocks=32, block_size=8,
              weight_dtype="float32", verbose=False)
PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 1], [120, 33, 8, 64, 2, 11, 90]]


def main():
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before JAX starts
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAXINFER_QUIET", "1")
    from jaxinfer import LLM, SamplingParams

    process_id, address, model, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    llm = LLM(model, tensor_parallel_size=4, pipeline_parallel_size=2, coordinator_address=address,
              num_processes=2, process_id=process_id, **ENGINE)  # process 1: returns when process 0 is done
    if llm.engine.is_follower:
        return
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    with open(out, "w") as f:
        json.dump([o.token_ids for o in outs], f)


if __name__ == "__main__":
    main()
