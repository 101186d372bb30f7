"""Runs inside the llama.cpp environment (transformers < 5, llama-cpp-python): not part of ffnfusion's
import graph, it imports nothing from it.

    python deci_engine.py CONVERTER_DIR HF_DIR GGUF_FILE REQUEST.json RESULT.npz

1. converts the Hugging Face checkpoint with llama.cpp's own ``convert_hf_to_gguf.py`` to an f32 GGUF;
2. runs it with llama-cpp-python (f32 KV cache, so round-off is the weights' alone): greedy tokens
   from ``prompt`` and the logits at every position of prompt + tokens (the last one excepted).
"""

import json
import sys

import numpy as np

LLAMA3_VOCAB = 128256  # the only vocabulary size llama.cpp's deci converter reads as GPT-2-style BPE


def convert(converter_dir: str, hf_dir: str, gguf_file: str) -> None:
    sys.path.insert(0, converter_dir)
    import convert_hf_to_gguf
    from conversion.deci import DeciModel

    original = DeciModel.set_vocab

    def set_vocab(self):
        # Other vocabularies take DeciLM-7B's sentencepiece path; SmolLM-style byte-level BPE needs the
        # converter's own GPT-2 reader.
        if self.hparams.get("vocab_size") == LLAMA3_VOCAB:
            return original(self)
        return self._set_vocab_gpt2()

    DeciModel.set_vocab = set_vocab
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", gguf_file, "--outtype", "f32"]
    convert_hf_to_gguf.main()


def run(gguf_file: str, prompt: list[int], steps: int, threads: int) -> tuple[list[int], np.ndarray]:
    from llama_cpp import Llama

    context = len(prompt) + steps + 8
    llm = Llama(model_path=gguf_file, n_ctx=context, n_batch=context, n_threads=threads, logits_all=True,
                type_k=0, type_v=0, verbose=False)  # type 0 = GGML_TYPE_F32 for the KV cache
    llm.eval(prompt)
    generated: list[int] = []
    for step in range(steps):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if step + 1 < steps:
            llm.eval([generated[-1]])
    return generated, np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


def main() -> None:
    converter_dir, hf_dir, gguf_file, request_file, result_file = sys.argv[1:6]
    request = json.loads(open(request_file).read())
    convert(converter_dir, hf_dir, gguf_file)
    tokens, logits = run(gguf_file, request["prompt"], request["steps"], request.get("threads", 2))
    np.savez(result_file, tokens=np.array(tokens, np.int64), logits=logits)


if __name__ == "__main__":
    main()
