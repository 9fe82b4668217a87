"""Retail database and tools: Nordbay's catalog, orders, returns and cancellations (conversations in retail.py).

Database: one customer per conversation with 2-3 orders (pending, shipped, delivered or
cancelled) over a fixed invented catalog.  Policy rules the tools enforce: pending orders can be
cancelled or re-addressed, delivered items can be returned within 30 days.  FIRST_NAMES and
LAST_NAMES are shared with the airline and telecom databases.
"""

from __future__ import annotations

import random
from typing import Any

from data.synthetic.world import NUMBER, STRING, Db, Tool, ToolResult, enum, error, params, replace_record

CATALOG: dict[str, tuple[str, float]] = {
    "P101": ("desk lamp", 24.0), "P102": ("wool scarf", 18.5), "P103": ("coffee grinder", 39.0),
    "P104": ("yoga mat", 22.0), "P105": ("water bottle", 12.5), "P106": ("phone case", 9.0),
    "P107": ("hiking boots", 89.0), "P108": ("rain jacket", 64.0), "P109": ("bluetooth speaker", 45.0),
    "P110": ("cutting board", 16.0), "P111": ("tea kettle", 29.5), "P112": ("backpack", 54.0),
    "P113": ("wall clock", 21.0), "P114": ("throw pillow", 14.0), "P115": ("table fan", 33.0),
    "P116": ("usb cable", 7.5), "P117": ("notebook set", 11.0), "P118": ("sunglasses", 27.0),
    "P119": ("running shoes", 76.0), "P120": ("chef knife", 42.0),
}
FIRST_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
               "Mei", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara")
LAST_NAMES = ("Ruiz", "Okafor", "Lind", "Patel", "Moreau", "Kowalski", "Tanaka", "Silva", "Novak", "Haddad",
              "Berg", "Costa", "Dubois", "Ivanova", "Jensen", "Khan", "Mendes", "Park", "Rossi", "Weber")
STREETS = ("Oak St", "Pine Rd", "Harbor Ave", "Elm Ct", "Mill Ln", "Lake Dr", "Cedar Way", "Hill St")
CITIES = ("Springfield", "Lakeview", "Riverton", "Fairmont", "Brookside", "Easton")
CARRIERS = ("UPS", "FedEx", "USPS")
RETURN_DAYS = 30


def random_address(rng: random.Random) -> str:
    return f"{rng.randint(2, 98)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"


def make_db(rng: random.Random) -> Db:
    """One customer with 2-3 orders, and the catalog (stock varies per conversation).

    Statuses are random, but 80% of customers have one pending and one recently delivered order,
    so that most cancel and return requests are allowed and refusals stay a minority.
    """
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    user_id = f"U{rng.randint(100, 999)}"
    order_ids = [f"O{number}" for number in rng.sample(range(1000, 10000), rng.randint(2, 3))]
    statuses = rng.choices(("pending", "shipped", "delivered", "cancelled"), (4, 3, 5, 1), k=len(order_ids))
    if rng.random() < 0.8:
        statuses[:2] = ["pending", "recent"]
        rng.shuffle(statuses)
    orders: dict[str, dict[str, Any]] = {}
    for order_id, status in zip(order_ids, statuses):
        recent = status == "recent"
        status = "delivered" if recent else status
        items = [{"item_id": product_id, "name": CATALOG[product_id][0], "price": CATALOG[product_id][1]}
                 for product_id in sorted(rng.sample(sorted(CATALOG), rng.randint(1, 3)))]
        order: dict[str, Any] = {"order_id": order_id, "user_id": user_id, "status": status, "items": items,
                                 "total": round(sum(item["price"] for item in items), 2),
                                 "address": random_address(rng)}
        if status == "delivered":
            order["days_since_delivery"] = rng.randint(2, RETURN_DAYS) if recent or rng.random() < 0.5 else \
                rng.randint(RETURN_DAYS + 1, 60)
        if status == "shipped":
            order.update(carrier=rng.choice(CARRIERS), tracking=f"TRK{rng.randint(10000, 99999)}",
                         eta_days=rng.randint(2, 6))  # >= 2: the answers say 'days'
        orders[order_id] = order
    user = {"user_id": user_id, "first_name": first, "last_name": last,
            "email": f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@mail.com",
            "zip": f"{rng.randint(10000, 99999)}", "orders": order_ids}
    products = {product_id: {"product_id": product_id, "name": name, "price": price,
                             "in_stock": rng.random() < 0.8}
                for product_id, (name, price) in CATALOG.items()}
    return {"users": {user_id: user}, "orders": orders, "products": products}


# ----------------------------------------------------------------------------- tools


def find_user_by_email(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    for user in db["users"].values():
        if user["email"] == args["email"].strip().lower():
            return {"user_id": user["user_id"]}, db
    return error("no user with this email"), db


def find_user_by_name_zip(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    for user in db["users"].values():
        if (user["first_name"].lower(), user["last_name"].lower(), user["zip"]) == (
                args["first_name"].lower(), args["last_name"].lower(), args["zip"]):
            return {"user_id": user["user_id"]}, db
    return error("no user with this name and zip"), db


def get_user(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    user = db["users"].get(args["user_id"])
    if user is None:
        return error(f"user {args['user_id']} not found"), db
    return {"user_id": user["user_id"], "name": f"{user['first_name']} {user['last_name']}",
            "orders": list(user["orders"])}, db


def get_order(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    order = db["orders"].get(args["order_id"])
    if order is None:
        return error(f"order {args['order_id']} not found"), db
    view = {key: order[key] for key in ("order_id", "status", "items", "total")}
    if "days_since_delivery" in order:
        view["days_since_delivery"] = order["days_since_delivery"]
    return view, db


def track_order(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    order = db["orders"].get(args["order_id"])
    if order is None:
        return error(f"order {args['order_id']} not found"), db
    if order["status"] != "shipped":
        return error(f"order {order['order_id']} is {order['status']}, not in transit"), db
    return {key: order[key] for key in ("order_id", "carrier", "tracking", "eta_days")}, db


def cancel_order(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    order = db["orders"].get(args["order_id"])
    if order is None:
        return error(f"order {args['order_id']} not found"), db
    if order["status"] != "pending":
        return error(f"order {order['order_id']} is {order['status']} and cannot be cancelled"), db
    updated = {**order, "status": "cancelled"}
    return ({"order_id": order["order_id"], "status": "cancelled", "refund": order["total"]},
            replace_record(db, "orders", order["order_id"], updated))


def return_items(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    order = db["orders"].get(args["order_id"])
    if order is None:
        return error(f"order {args['order_id']} not found"), db
    if order["status"] != "delivered" or order.get("days_since_delivery", 0) > RETURN_DAYS:
        return error(f"order {order['order_id']} is not returnable"), db
    prices = {item["item_id"]: item["price"] for item in order["items"]}
    unknown = [item_id for item_id in args["item_ids"] if item_id not in prices]
    if unknown:
        return error(f"items {unknown} are not in order {order['order_id']}"), db
    refund = round(sum(prices[item_id] for item_id in args["item_ids"]), 2)
    method = args.get("refund_method", "original")
    updated = {**order, "status": "return requested"}
    return ({"order_id": order["order_id"], "status": "return requested", "refund": refund,
             "refund_method": method}, replace_record(db, "orders", order["order_id"], updated))


def change_address(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    order = db["orders"].get(args["order_id"])
    if order is None:
        return error(f"order {args['order_id']} not found"), db
    if order["status"] != "pending":
        return error(f"order {order['order_id']} is {order['status']}; address cannot change"), db
    updated = {**order, "address": args["address"]}
    return ({"order_id": order["order_id"], "address": args["address"]},
            replace_record(db, "orders", order["order_id"], updated))


def search_products(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    query = args["query"].lower()
    limit = args.get("max_price", float("inf"))
    matches = [{key: product[key] for key in ("product_id", "name", "price", "in_stock")}
               for product in db["products"].values()
               if any(word in product["name"] for word in query.split()) and product["price"] <= limit]
    return {"results": matches[:3]}, db


TOOLS = (
    Tool("find_user_by_email", "Find a user by email.", params({"email": STRING}), find_user_by_email,
         auth_key="user_id"),
    Tool("find_user_by_name_zip", "Find a user by name and zip.",
         params({"first_name": STRING, "last_name": STRING, "zip": STRING}), find_user_by_name_zip,
         auth_key="user_id"),
    Tool("get_user", "Get a user's orders.", params({"user_id": STRING}), get_user),
    Tool("get_order", "Get an order.", params({"order_id": STRING}), get_order),
    Tool("track_order", "Track a shipped order.", params({"order_id": STRING}), track_order),
    Tool("cancel_order", "Cancel a pending order.",
         params({"order_id": STRING, "reason": enum("no longer needed", "ordered by mistake")}), cancel_order,
         writes=True),
    Tool("return_items", "Return delivered items.",
         params({"order_id": STRING, "item_ids": {"type": "array", "items": STRING, "minItems": 1}},
                {"refund_method": enum("original", "gift_card")}), return_items, writes=True),
    Tool("change_address", "Change a pending order's address.",
         params({"order_id": STRING, "address": STRING}), change_address, writes=True),
    Tool("search_products", "Search products.",
         params({"query": STRING}, {"max_price": NUMBER}), search_products, public=True),
)
