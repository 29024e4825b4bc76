"""The gpt-oss model: its config, checkpoint layout and loading, and the torch modules."""
