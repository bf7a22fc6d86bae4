# Custom code shipped with a model: never imported unless the user sets trust_remote_code.
raise RuntimeError("remote code was executed without trust_remote_code")
