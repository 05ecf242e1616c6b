"""The offline API: an ``LLM`` driving the one runtime from this process."""

from dataplane.llm.llm import LLM
from dataplane.llm.report import RefactorReport

__all__ = ["LLM", "RefactorReport"]
