"""Test doubles that run as real servers on 127.0.0.1: the fake OpenAI-compatible LLM (also the demo model of
``claw demo``) and the fake WeCom API. Product code (broker/, edge/, node/) never imports this package.
"""
