"""Integrations with other libraries, each behind its extra; they use xent's losses as any user would."""
