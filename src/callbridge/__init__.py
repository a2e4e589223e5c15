"""callbridge: put a voice AI agent on the phone, and never leave a call dangling."""
