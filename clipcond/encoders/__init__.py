"""The towers and everything that gets weights into them, composed by ``TextConditioner``.

``model`` (the CLIP text transformer), ``convert`` (published key layouts to ours), ``weights`` (finding and
reading weight files), ``openclip`` (any open_clip text tower as a spec), ``names`` (encoder names to specs),
``textual_inversion`` (embedding files), ``hub`` (the Hugging Face hub and cache), ``t5`` (T5, UMT5 and Gemma-2
towers and their tokenizers), ``recipes`` (T5 recipes: the pipelines' tensors from the towers'), ``prompting``
(the prompt languages on the towers), ``conditioner`` (``TextConditioner``). Imports ``text`` and the leaves.
"""
