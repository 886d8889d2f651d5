"""tianying (天鹰): load, run, train, finetune, quantize, serve and evaluate Aquila models."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import tianying` stays cheap for the CLI's --help
    if name == "LLM":
        from tianying.api import LLM

        return LLM
    if name == "render_chat":
        from tianying.templates import render_chat

        return render_chat
    if name == "Config":
        from tianying.config import Config

        return Config
    raise AttributeError(name)


__all__ = ["LLM", "render_chat", "Config", "__version__"]
