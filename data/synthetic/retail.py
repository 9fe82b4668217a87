"""Retail domain (in-domain): Nordbay, an invented online shop with orders, returns and cancellations.

Database: one customer per conversation with 2-3 orders (pending, shipped, delivered or
cancelled) over a fixed invented catalog.  Policy rules the scripts follow and the tools enforce:
authenticate first (email, or name + zip), pending orders can be cancelled or re-addressed,
delivered items can be returned within 30 days, every change needs an explicit yes.
"""

from __future__ import annotations

import random
from typing import Any

from data.synthetic.world import (
    NUMBER, STRING, Db, Dialogue, Domain, Tool, ToolResult, confirm_write, converse, enum, error, listing,
    money, params, replace_record, sentences,
)

POLICY = (
    "You are the support agent of Nordbay, an online shop. Authenticate the user by email or by name "
    "and zip before any account action. Ask for missing details; if the user names an item but no "
    "order id, find the order among their orders. Only pending orders can be cancelled or get a new "
    "address. Delivered items can be returned within 30 days, refunded to the original payment or a "
    "gift card if asked. Before a change, state it and wait for an explicit yes. Refuse anything else."
)

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


# ----------------------------------------------------------------------------- conversations


def describe_items(items: list[dict[str, Any]]) -> str:
    return listing([f"{item['name']} ({item['item_id']}, {money(item['price'])})" for item in items])


class RetailChat:
    """Scripts one retail conversation about the database's single customer."""

    def __init__(self, dlg: Dialogue) -> None:
        self.dlg = dlg
        self.rng = dlg.rng
        self.user = next(iter(dlg.db["users"].values()))
        self.auth_mode = self.rng.choice(("email", "name_zip"))
        self.upfront_auth = self.rng.random() < 0.75
        self.typo = self.auth_mode == "email" and self.rng.random() < 0.1

    # -- shared steps

    def auth_sentence(self, email: str | None = None) -> str:
        user = self.user
        if self.auth_mode == "email":
            return self.dlg.pick(("My email is {email}.", "You can find me under {email}.", "Email: {email}.",
                                  "My account email is {email}."), email=email or user["email"])
        return self.dlg.pick(("I'm {first} {last}, zip {zip}.", "My name is {first} {last} and my zip code is {zip}.",
                              "Zip {zip}, name {first} {last}.", "This is {first} {last} from zip {zip}."),
                             first=user["first_name"], last=user["last_name"], zip=user["zip"])

    def wrong_email(self) -> str:
        local, domain = self.user["email"].split("@")
        return f"{local[:-1]}@{domain}" if local[-1].isdigit() else f"{local}x@{domain}"

    def open_request(self, first: bool, request: str, goal: str, order_id: str | None,
                     can_search: bool = False) -> bool:
        """The user's request, then authentication and the order id when they are missing.

        `order_id` is the order the request is about; the request text already names it unless the
        user left it out.  Then the assistant asks for it, except when `can_search` (the user named
        the item, so the policy says to find the order): the return value is True when the caller
        must search the user's orders.
        """
        dlg = self.dlg
        needs_auth = dlg.authenticated is None
        gave_auth = needs_auth and first and self.upfront_auth
        email = self.wrong_email() if self.typo else None
        parts = [request] + ([self.auth_sentence(email)] if gave_auth else [])
        dlg.user(sentences(dlg, parts) if len(parts) > 1 else request)
        order_missing = order_id is not None and order_id not in request
        if order_missing and can_search:
            order_missing, must_search = False, True
        else:
            must_search = False
        if needs_auth and not gave_auth:
            with_order = order_missing and self.rng.random() < 0.5
            wanted = "email, or name and zip code" + (", and the order id" if with_order else "")
            ask = "your " + wanted
            dlg.say(dlg.pick(("I can help with that. First, please give me {ask}.", "Sure. To verify you, I need {ask}.",
                              "Happy to help. Could you share {ask}?"), ask=ask),
                    f"The user wants to {goal} but is not authenticated. The policy requires authentication "
                    f"first, so I ask for their {wanted}.")
            answer = [self.auth_sentence(email)]
            if with_order:
                answer.append(dlg.pick(("The order is {order}.", "Order id {order}.", "It's order {order}."),
                                       order=order_id))
                order_missing = False
            dlg.user(sentences(dlg, answer) if len(answer) > 1 else answer[0])
        if needs_auth:
            self.authenticate()
        if order_missing:
            dlg.say(dlg.pick(("Which order is it? Please give me the order id.", "Could you tell me the order id?",
                              "Sure, what is the order id?")),
                    f"The user is authenticated as {dlg.authenticated} and wants to {goal}, but named neither "
                    "the order id nor an item to find it by. I must ask for the id instead of guessing.")
            dlg.user(dlg.pick(("It's {order}.", "{order}.", "The order id is {order}.", "Order {order}, thanks."),
                              order=order_id))
        return must_search

    def search_orders(self, items: list[dict[str, Any]], goal: str) -> dict[str, Any]:
        """Find the order holding `items` the way the policy says: list the orders, open them in turn."""
        dlg = self.dlg
        names = listing([item["name"] for item in items])
        result = dlg.call("get_user", {"user_id": dlg.authenticated},
                          f"The user is authenticated as {dlg.authenticated} and wants to {goal}, naming the "
                          f"{names} but no order id. I call get_user to list their orders.")
        wanted = {item["item_id"] for item in items}
        checked: list[str] = []
        for order_id in result["orders"]:
            if checked:
                reasoning = (f"Order {checked[-1]} does not contain the {names}. I check the next order, "
                             f"{order_id}, with get_order.")
            else:
                reasoning = (f"get_user lists {listing(result['orders'])}. I look for the {names} by calling "
                             f"get_order on the first, {order_id}.")
            current = dlg.call("get_order", {"order_id": order_id}, reasoning)
            if wanted <= {item["item_id"] for item in current["items"]}:
                return current
            checked.append(order_id)
        raise RuntimeError("the named items are in none of the user's orders")  # make_db guarantees one

    def authenticate(self) -> None:
        dlg, user = self.dlg, self.user
        if self.auth_mode == "name_zip":
            dlg.call("find_user_by_name_zip",
                     {"first_name": user["first_name"], "last_name": user["last_name"], "zip": user["zip"]},
                     f"The user gave the name {user['first_name']} {user['last_name']} and zip {user['zip']}. "
                     "I must authenticate before any account action, so I call find_user_by_name_zip.")
            return
        if self.typo:
            bad = self.wrong_email()
            dlg.call("find_user_by_email", {"email": bad},
                     f"The user gave the email {bad}. I must authenticate first, so I call find_user_by_email.")
            dlg.say(dlg.pick(("I couldn't find an account with {email}. Could you check the email address?",
                              "There is no account under {email}. Could you double-check it?"), email=bad),
                    f"find_user_by_email found no user with {bad}, so the user is not authenticated. "
                    "I ask them to check the email.")
            dlg.user(dlg.pick(("Sorry, it's {email}.", "Oops, I meant {email}.", "Try {email}."),
                              email=user["email"]))
            self.typo = False
        dlg.call("find_user_by_email", {"email": user["email"]},
                 f"The user gave the email {user['email']}. I must authenticate before any account action, "
                 "so I call find_user_by_email.")

    def look_up(self, order_id: str, why: str) -> dict[str, Any]:
        return self.dlg.call("get_order", {"order_id": order_id},
                             f"The user is authenticated as {self.dlg.authenticated} and asked about order "
                             f"{order_id}. I call get_order to {why}.")

    def pick_order(self, wanted: tuple[str, ...], bias: float = 0.85, returnable: bool = False) -> dict[str, Any]:
        """An order of the customer: with probability `bias` one with a status in `wanted` (and
        delivered at most 30 days ago if `returnable`) when one exists, else any order."""
        orders = [self.dlg.db["orders"][order_id] for order_id in self.user["orders"]]
        fitting = [order for order in orders if order["status"] in wanted
                   and (not returnable or order.get("days_since_delivery", 0) <= RETURN_DAYS)]
        return self.rng.choice(fitting if fitting and self.rng.random() < bias else orders)

    def request_order(self, first: bool, order: dict[str, Any], goal: str, with_id: tuple[str, ...],
                      by_item: tuple[str, ...], without_id: tuple[str, ...],
                      **slots: Any) -> tuple[str, dict[str, Any] | None]:
        """The user's request about `order`, naming its id (60%), one of its items (25%) or neither
        (15%, the assistant asks for the id); then authentication.  Returns the order id and, when
        the order had to be found among the user's orders, its get_order view (else None: the
        caller decides which tool reads it)."""
        roll = self.rng.random()
        templates = with_id if roll < 0.6 else by_item if roll < 0.85 else without_id
        item = self.rng.choice(order["items"])
        request = self.dlg.pick(templates, order=order["order_id"], item=item["name"], **slots)
        searching = templates is by_item
        self.open_request(first, request, goal, order["order_id"], can_search=searching)
        if not searching:
            return order["order_id"], None
        current = self.search_orders([item], goal)
        return current["order_id"], current

    def order_phrase(self, order_id: str, with_id: tuple[str, ...], without_id: tuple[str, ...], **slots: Any) -> str:
        """The request text: naming the order (75%) or leaving the id out for the assistant to ask."""
        templates = with_id if self.rng.random() < 0.75 else without_id
        return self.dlg.pick(templates, order=order_id, **slots)

    # -- intents

    def cancel(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("pending",))
        order_id = order["order_id"]
        reason = self.rng.choice(("no longer needed", "ordered by mistake"))
        reason_text = {"no longer needed": self.rng.choice(("I don't need it anymore", "I no longer need it")),
                       "ordered by mistake": self.rng.choice(("I ordered it by mistake", "it was a mistake"))}[reason]
        order_id, current = self.request_order(
            first, order, "cancel an order",
            ("I'd like to cancel order {order}, {why}.", "Please cancel my order {order}; {why}.",
             "Can you cancel {order}? {Why}."),
            ("Please cancel the order with the {item}; {why}.", "I want to cancel my {item} order, {why}."),
            ("I want to cancel an order, {why}.", "Please cancel my order, {why}."),
            why=reason_text, Why=reason_text[0].upper() + reason_text[1:])
        current = current or self.look_up(order_id, "check that it is still pending")
        if current["status"] != "pending":
            dlg.say(dlg.pick(("Sorry, order {order} is {status}, so it can no longer be cancelled.",
                              "I can't cancel order {order}: it is already {status}. Only pending orders can be cancelled."),
                             order=order_id, status=current["status"]),
                    f"get_order shows order {order_id} is {current['status']}. Only pending orders can be "
                    "cancelled, so I refuse without calling cancel_order.")
            return
        total = money(current["total"])
        confirm_write(dlg, 
            dlg.pick(("Order {order} with {items} is pending. Cancelling it refunds {total} to your original payment. "
                      "Shall I go ahead?",
                      "I can cancel order {order} for the reason '{reason}'; you'd get {total} back. Do you confirm?"),
                     order=order_id, items=describe_items(current["items"]), total=total, reason=reason),
            f"Order {order_id} is pending, so it can be cancelled, with a refund of the order total {total}. "
            "The policy needs an explicit yes before I call cancel_order, so I ask for confirmation.",
            ("cancel_order", {"order_id": order_id, "reason": reason}),
            f"The user confirmed. I call cancel_order for {order_id} with the reason '{reason}' they gave.",
            lambda result: (dlg.pick(("Done: order {order} is cancelled and {refund} will be refunded.",
                                      "Order {order} is now cancelled. You'll get {refund} back."),
                                     order=order_id, refund=money(result["refund"])),
                            f"cancel_order succeeded: {order_id} is cancelled with a refund of "
                            f"{money(result['refund'])}. I tell the user."),
            dlg.pick(("Okay, I've left order {order} as it is.", "No problem, order {order} stays active."),
                     order=order_id))

    def return_(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("delivered",), returnable=True)
        order_id = order["order_id"]
        count = self.rng.randint(1, len(order["items"]))
        chosen = sorted(self.rng.sample(order["items"], count), key=lambda item: item["item_id"])
        name_items = self.rng.random() < 0.7
        names = listing([item["name"] for item in chosen])
        gift_card = self.rng.random() < 0.25
        what = f"the {names}" if name_items else "something"
        request = self.order_phrase(
            order_id, ("I want to return {what} from order {order}.", "Can I send back {what} from {order}?",
                       "I'd like a return for {what} in order {order}."),
            ("I want to return {what} I bought.", "I need to send back {what} from an order."), what=what)
        if gift_card:
            request += " " + self.rng.choice(("Please refund it as a gift card.", "A gift card refund is fine."))
        if self.open_request(first, request, "return items", order_id, can_search=name_items):
            current = self.search_orders(chosen, "return items")
            order_id = current["order_id"]
        else:
            current = self.look_up(order_id, "check its status and items")
        days = current.get("days_since_delivery")
        if current["status"] != "delivered" or days > RETURN_DAYS:
            why = (f"it was delivered {days} days ago, more than {RETURN_DAYS}" if current["status"] == "delivered"
                   else f"it is {current['status']}, not delivered")
            dlg.say(dlg.pick(("Sorry, order {order} can't be returned: {why}.",
                              "I'm unable to return items from order {order} because {why}."), order=order_id, why=why),
                    f"get_order shows order {order_id}: {why}. Returns need a delivered order within "
                    f"{RETURN_DAYS} days, so I refuse and do not call return_items.")
            return
        if not name_items:
            dlg.say(dlg.pick(("Order {order} has {items}. Which items do you want to return?",
                              "Which items from order {order} should I return: {items}?"),
                             order=order_id, items=describe_items(current["items"])),
                    f"Order {order_id} was delivered {days} days ago, so returns are allowed, but the user did "
                    "not say which items. I list them and ask.")
            dlg.user(dlg.pick(("The {names}.", "Just the {names}, please.", "I'd return the {names}."), names=names))
        refund = round(sum(item["price"] for item in chosen), 2)
        method = "gift_card" if gift_card else "original"
        arguments: dict[str, Any] = {"order_id": order_id, "item_ids": [item["item_id"] for item in chosen]}
        if gift_card:
            arguments["refund_method"] = "gift_card"
        prices = " + ".join(money(item["price"]) for item in chosen)
        arithmetic = f"{prices} = {money(refund)}" if len(chosen) > 1 else money(refund)
        destination = "a gift card" if gift_card else "your original payment"
        confirm_write(dlg, 
            dlg.pick(("I can return {items} from order {order}. The refund of {refund} goes to {dest}. Confirm?",
                      "Returning {items} from {order} gives a refund of {refund} to {dest}. Shall I proceed?"),
                     items=describe_items(chosen), order=order_id, refund=money(refund), dest=destination),
            f"Order {order_id} was delivered {days} days ago, within {RETURN_DAYS}, so the return is allowed. "
            f"Refund: {arithmetic}. I need an explicit yes before calling return_items.",
            ("return_items", arguments),
            f"The user confirmed. I call return_items for {order_id} with item ids "
            f"{', '.join(arguments['item_ids'])}" + (" and a gift card refund." if gift_card else "."),
            lambda result: (dlg.pick(("Your return for order {order} is requested. {refund} will go to {dest}.",
                                      "Done. The return is requested and {refund} will be refunded to {dest}."),
                                     order=order_id, refund=money(result["refund"]), dest=destination),
                            f"return_items succeeded with a refund of {money(result['refund'])} to "
                            f"{'a gift card' if method == 'gift_card' else 'the original payment'}. I tell the user."),
            dlg.pick(("Alright, no return was made for order {order}.", "Okay, I won't start the return."),
                     order=order_id))

    def readdress(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("pending",), bias=0.75)
        order_id = order["order_id"]
        address = random_address(self.rng)
        order_id, current = self.request_order(
            first, order, "change a shipping address",
            ("Please ship order {order} to {address} instead.", "Can you change the address of {order} to {address}?"),
            ("Please send the order with the {item} to {address}.", "Ship my {item} to {address} instead."),
            ("I moved; please send my order to {address}.", "I need my order delivered to {address}."),
            address=address)
        current = current or self.look_up(order_id, "check that it is pending")
        if current["status"] != "pending":
            dlg.say(dlg.pick(("Sorry, order {order} is {status}, so its address can't be changed.",
                              "I can't change the address: order {order} is already {status}."),
                             order=order_id, status=current["status"]),
                    f"get_order shows order {order_id} is {current['status']}. Only pending orders can get a "
                    "new address, so I refuse without calling change_address.")
            return
        confirm_write(dlg, 
            dlg.pick(("Order {order} is pending. I'll change its shipping address to {address}. Is that right?",
                      "I can send order {order} to {address}. Shall I update it?"), order=order_id, address=address),
            f"Order {order_id} is pending, so its address can change. I need an explicit yes before calling "
            "change_address.",
            ("change_address", {"order_id": order_id, "address": address}),
            f"The user confirmed. I call change_address for {order_id} with the new address {address}.",
            lambda result: (dlg.pick(("Updated: order {order} will ship to {address}.",
                                      "Done, order {order} now goes to {address}."),
                                     order=order_id, address=result["address"]),
                            f"change_address succeeded for {order_id}. I confirm the new address."),
            dlg.pick(("Okay, the address of order {order} stays the same.", "No change made to order {order}."),
                     order=order_id))

    def status(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("pending", "shipped", "delivered", "cancelled"))
        order_id = order["order_id"]
        order_id, current = self.request_order(
            first, order, "know an order's status",
            ("What's the status of order {order}?", "Can you check on my order {order}?",
             "Has order {order} arrived yet?"),
            ("What's the status of my {item} order?", "Has my {item} arrived yet?"),
            ("Can you check the status of my order?", "I'd like an update on an order."))
        current = current or self.look_up(order_id, "read its status")
        if current["status"] == "shipped":
            # A shipped order's status answer gives its tracking, which takes a second read.
            tracking = dlg.call("track_order", {"order_id": order_id},
                                f"get_order shows {order_id} has shipped. The user wants to know where it is, so I "
                                "call track_order for the carrier and tracking number.")
            dlg.say(dlg.pick(("Order {order} has shipped with {carrier} (tracking {tracking}) and should arrive in "
                              "{eta} days.", "It's on its way: {carrier}, tracking {tracking}, about {eta} days left."),
                             order=order_id, carrier=tracking["carrier"], tracking=tracking["tracking"],
                             eta=tracking["eta_days"]),
                    f"track_order shows {tracking['carrier']}, tracking {tracking['tracking']}, ETA "
                    f"{tracking['eta_days']} days. I answer with these facts.")
            return
        facts = {"pending": "is pending and has not shipped yet", "cancelled": "was cancelled",
                 "delivered": f"was delivered {current.get('days_since_delivery')} days ago",
                 "return requested": "has a return in progress"}[current["status"]]
        dlg.say(dlg.pick(("Order {order} {facts}. It contains {items}, total {total}.",
                          "Your order {order} {facts}. Total: {total}."),
                         order=order_id, facts=facts, items=describe_items(current["items"]),
                         total=money(current["total"])),
                f"get_order returned status {current['status']} for {order_id}, which is not shipped, so there "
                "is nothing to track. I answer with the status.")

    def track(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("shipped",), bias=0.75)
        order_id = order["order_id"]
        order_id, current = self.request_order(
            first, order, "track a package",
            ("Where is my package for order {order}?", "Can I get tracking for {order}?",
             "When will order {order} arrive?"),
            ("Where is my {item}? I need the tracking.", "Can I get tracking for the order with the {item}?"),
            ("Where is my package?", "Can I get the tracking number of my order?"))
        if current is not None and current["status"] != "shipped":
            dlg.say(dlg.pick(("Order {order} is not in transit: it is {status}.",
                              "There's no tracking for order {order} because it is {status}."),
                             order=order_id, status=current["status"]),
                    f"get_order shows {order_id} is {current['status']}, not shipped, so there is no tracking "
                    "and no need to call track_order. I tell the user the status.")
            return
        result = dlg.call("track_order", {"order_id": order_id},
                          f"The user is authenticated as {dlg.authenticated} and wants tracking for {order_id}, "
                          "so I call track_order.")
        if "error" in result:
            status = dlg.db["orders"][order_id]["status"]
            dlg.say(dlg.pick(("Order {order} is not in transit: it is {status}.",
                              "There's no tracking for order {order} because it is {status}."),
                             order=order_id, status=status),
                    f"track_order says {order_id} is {status}, not in transit, so there is no tracking to give. "
                    "I tell the user the status.")
            return
        dlg.say(dlg.pick(("Order {order} is with {carrier}, tracking {tracking}, arriving in about {eta} days.",
                          "It's on the way with {carrier} (tracking {tracking}); expected in {eta} days."),
                         order=order_id, carrier=result["carrier"], tracking=result["tracking"],
                         eta=result["eta_days"]),
                f"track_order shows {order_id} with {result['carrier']}, tracking {result['tracking']}, "
                f"ETA {result['eta_days']} days. I pass these facts on.")

    def list_orders(self, dlg: Dialogue, first: bool) -> None:
        request = dlg.pick(("Which orders do I have with you?", "Can you list my orders?",
                            "What orders are on my account?"))
        self.open_request(first, request, "see their orders", None)
        result = dlg.call("get_user", {"user_id": dlg.authenticated},
                          f"The user is authenticated as {dlg.authenticated} and wants their orders, so I call "
                          "get_user with that id.")
        orders = result["orders"]
        dlg.say(dlg.pick(("You have {count} orders: {orders}.", "I see {count} orders on your account: {orders}."),
                         count=len(orders), orders=listing(orders)),
                f"get_user lists {len(orders)} orders for {dlg.authenticated}: {listing(orders)}. I answer with them.")

    def latest(self, dlg: Dialogue, first: bool) -> None:
        """Two reads in a row: the order list, then the newest order (the last id in the list)."""
        request = dlg.pick(("What's the status of my latest order?", "Where is my most recent order?",
                            "Can you check my last order?"))
        self.open_request(first, request, "check their latest order", None)
        result = dlg.call("get_user", {"user_id": dlg.authenticated},
                          f"The user is authenticated as {dlg.authenticated} but gave no order id for the latest "
                          "order. get_user lists their orders, so I call it.")
        newest = result["orders"][-1]
        current = dlg.call("get_order", {"order_id": newest},
                           f"get_user lists {listing(result['orders'])}; the latest is the last one, {newest}. "
                           "I call get_order for its status.")
        dlg.say(dlg.pick(("Your latest order, {order}, is {status}. It has {items}.",
                          "Order {order} is your most recent one; its status is {status}."),
                         order=newest, status=current["status"], items=describe_items(current["items"])),
                f"get_order shows the latest order {newest} is {current['status']}. I answer with it.")

    def search(self, dlg: Dialogue, first: bool) -> None:
        product_id = self.rng.choice(sorted(CATALOG))
        name, price = CATALOG[product_id]
        keyword = name.split()[-1]
        arguments: dict[str, Any] = {"query": keyword}
        request = dlg.pick(("Do you sell any {kw}?", "I'm looking for a {kw}.", "Do you have {kw}s in stock?"),
                           kw=keyword)
        if self.rng.random() < 0.4:
            limit = int(price) + self.rng.choice((-5, 10, 20))
            arguments["max_price"] = limit
            request += " " + self.rng.choice(("Under ${limit}, please.", "My budget is ${limit}.")).format(limit=limit)
        dlg.user(request)
        result = dlg.call("search_products", arguments,
                          f"The user asks for '{keyword}'. Catalog search needs no authentication, so I call "
                          "search_products" + (f" with max_price {arguments['max_price']}." if "max_price" in arguments
                                               else "."))
        found = result["results"]
        if not found:
            dlg.say(dlg.pick(("Sorry, I found no {kw} matching that.", "We have no {kw} in that price range.")
                             , kw=keyword),
                    "search_products returned no results, so I tell the user nothing matches.")
            return
        offers = listing([f"{item['name']} ({item['product_id']}) at {money(item['price'])}, "
                          + ("in stock" if item["in_stock"] else "out of stock") for item in found])
        dlg.say(dlg.pick(("We have {offers}.", "I found {offers}."), offers=offers),
                f"search_products returned {len(found)} result(s). I list name, id, price and stock.")

    def refuse(self, dlg: Dialogue, first: bool) -> None:
        request, reason = self.rng.choice((
            ("Can you give me a discount on my next order?", "I can't offer discounts"),
            ("Another shop sells this cheaper, can you match the price?", "we don't price match"),
            ("Could you waive the shipping fee for me?", "I can't waive fees"),
            ("Can you change the email on my account?", "I can't change account emails here")))
        dlg.user(request)
        dlg.say(dlg.pick(("Sorry, {reason}; the policy doesn't allow it.", "I'm afraid {reason}. Anything else?"),
                         reason=reason),
                f"The user asks for something the policy does not allow ({reason}). No tool can do it, so I "
                "refuse politely.")


def script(dlg: Dialogue) -> None:
    chat = RetailChat(dlg)
    openers = [(chat.cancel, 3), (chat.return_, 3), (chat.readdress, 1.5), (chat.status, 2), (chat.track, 1.5),
               (chat.list_orders, 1), (chat.latest, 1.5), (chat.search, 1)]
    followups = openers + [(chat.refuse, 0.7)]
    converse(dlg, openers, followups)


RETAIL = Domain("retail", POLICY, TOOLS, make_db, script)
