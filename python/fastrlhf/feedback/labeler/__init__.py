"""Human labeling: a queue of items (:mod:`.items`), and two front ends writing to a
:class:`~fastrlhf.feedback.store.PreferenceStore`: the terminal (:func:`run_terminal_labeler`) and a
local web page (:func:`serve_web_labeler`, :class:`WebLabeler`). Both need ``rich`` / ``starlette`` +
``uvicorn`` (the ``label`` extra), imported when they run."""

from fastrlhf.feedback.labeler.items import LabelItem, LabelQueue, generated_items, load_items
from fastrlhf.feedback.labeler.terminal import run_terminal_labeler
from fastrlhf.feedback.labeler.web import WebLabeler, serve_web_labeler

__all__ = ["LabelItem", "LabelQueue", "load_items", "generated_items", "run_terminal_labeler", "WebLabeler",
           "serve_web_labeler"]
