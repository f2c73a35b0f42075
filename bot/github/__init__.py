"""Trimo's GitHub side: App authentication, the API client and its write policy, the reporter."""
