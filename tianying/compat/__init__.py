"""Drop-in layers for code written against other toolkits (`tianying.compat.flagai`: FlagAI's Aquila API)."""
