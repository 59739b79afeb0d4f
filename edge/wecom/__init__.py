"""WeCom self-built app channel (智控未来): callbacks in, paced text replies out."""
