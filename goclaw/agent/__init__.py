"""The agent runtime: definitions, tools, sessions, model routing and the agent loop."""
