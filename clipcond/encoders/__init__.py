"""The towers and everything that gets weights into them, composed by ``TextConditioner``.

``model`` (the CLIP text transformer), ``convert`` (published key layouts to ours), ``weights`` (finding and
reading weight files), ``openclip`` (any open_clip text tower as a spec), ``names`` (encoder names to specs),
``textual_inversion`` (embedding files), ``conditioner`` (``TextConditioner``). Imports ``text`` and the leaves.
"""
