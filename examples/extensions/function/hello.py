def handler(event, context):
    print(f"hello from {context.aws_request_id}: {event}")
    return {"hello": event.get("name", "world")}
