"""Stand-ins for the outside world (callers, telephony, voice agents) for tests and demos."""
