"""Generate from the fine-tuned model in out/, to see what fine-tuning did.

    python infer_test.py                 # the model in SETTINGS["model_dir"] (out/)
    python infer_test.py demo/work/out   # or the one in this folder
"""

import sys
from pathlib import Path

SETTINGS = {
    "model_dir": "out",  # written by `deepspeed finetune.py`
    "base_model": None,  # e.g. "EleutherAI/gpt-j-6B": also generate from it (another 12 GB)
    "prompts": ["The", "Once upon a time", "In the beginning"],
    "max_new_tokens": 60,  # tokens generated after each prompt
    "do_sample": True,  # False = greedy: always the most likely token (repeats itself more)
    "temperature": 0.8,  # < 1 sharper and safer, > 1 more varied
    "top_p": 0.9,  # sample only from the most likely tokens that make up this much probability
    "samples_per_prompt": 1,
    "seed": 0,  # same seed, same samples
}


USAGE = ("usage: python infer_test.py [MODEL_FOLDER] (a folder finetune.py wrote; default: "
         "SETTINGS['model_dir']; the other settings are in SETTINGS at the top of infer_test.py)")


def main(arguments=()):
    """arguments: the command line after the script's name (none, or one model folder)."""
    settings = {**SETTINGS, "model_dir": model_dir_from(arguments, SETTINGS["model_dir"])}
    check_model_dir(settings["model_dir"])
    models = {"fine-tuned": settings["model_dir"]}
    if settings["base_model"]:
        models["base"] = settings["base_model"]
    for label, name in models.items():
        tokenizer, model = load(name)
        print(f"\n===== {label}: {name} =====")
        for prompt in settings["prompts"]:
            for completion in generate(model, tokenizer, prompt, settings):
                print(f"\n--- prompt: {prompt!r}\n{prompt}{completion}")


def model_dir_from(arguments, default):
    """The one optional argument, a model folder in place of SETTINGS["model_dir"]; anything else is
    refused, so a mistyped option never runs silently on another model."""
    if list(arguments) in (["-h"], ["--help"]):
        print(USAGE)
        raise SystemExit(0)
    if len(arguments) > 1 or (arguments and arguments[0].startswith("-")):
        given = " ".join(arguments)
        raise SystemExit(f"infer_test.py takes one model folder or nothing, not '{given}'; {USAGE}")
    return arguments[0] if arguments else default


def check_model_dir(model_dir):
    """out/ must hold a whole model: finetune.py writes it only once the save is complete."""
    folder = Path(model_dir)
    needed = ["config.json", "tokenizer_config.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not any(folder.glob("model*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        state = ("does not exist" if not folder.exists() else
                 f"is incomplete (no {', '.join(missing)})")
        raise SystemExit(f"infer_test.py: the model folder '{folder}' {state}. Run `deepspeed "
                         f"finetune.py` to write it, or name a saved model's folder: `python "
                         f"infer_test.py FOLDER`.")
    if Path(str(folder) + ".partial").exists():
        print(f"note: '{folder}.partial' is left from a run that stopped while saving; '{folder}' "
              f"is the older model.")


def load(name):
    """FP16 on a GPU (12 GB for GPT-J), FP32 on the CPU (no FP16 kernels there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(name)
    dtype = torch.float16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return tokenizer, model.to("cuda" if on_gpu else "cpu").eval()


def generate(model, tokenizer, prompt, settings):
    import torch

    torch.manual_seed(settings["seed"])
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    sampling = ({"temperature": settings["temperature"], "top_p": settings["top_p"]}
                if settings["do_sample"] else {})
    with torch.no_grad():
        outputs = model.generate(
            **inputs,
            max_new_tokens=settings["max_new_tokens"],
            do_sample=settings["do_sample"],
            num_return_sequences=settings["samples_per_prompt"],
            pad_token_id=tokenizer.eos_token_id,  # GPT-J has no pad token
            **sampling,
        )
    prompt_length = inputs["input_ids"].shape[1]
    return [tokenizer.decode(output[prompt_length:], skip_special_tokens=True)
            for output in outputs]


if __name__ == "__main__":
    main(sys.argv[1:])
