"""Prompts to token ids: the CLIP tokenizers, and prompts read as A1111, ComfyUI and compel read them.

``tokenizer`` (the CLIP BPE, both flavours), ``prompts`` (A1111 / ComfyUI syntax and 77-token windows),
``windows`` (prompts to weighted windows per tower), ``schedules`` (A1111 prompt editing, ``AND``),
``compel_style`` (compel's syntax and arithmetic, on CLIP and on T5 recipes), ``t5_tokens`` (the T5 / Gemma
tokenizers as the pipelines call them), ``comfy_t5`` (ComfyUI's reading of Flux's T5 prompts). Imports only the
package's leaves.
"""
