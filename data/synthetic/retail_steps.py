"""The steps the retail conversation scripts (retail.py) share: authenticate the user (email or
name + zip, with typos), find the order."""

from __future__ import annotations

from typing import Any

from data.synthetic.retail_tools import RETURN_DAYS
from data.synthetic.world import Dialogue, listing, money, sentences


def describe_items(items: list[dict[str, Any]]) -> str:
    return listing([f"{item['name']} ({item['item_id']}, {money(item['price'])})" for item in items])


class RetailSteps:
    """The steps every retail intent shares: authentication, finding the order."""

    def __init__(self, dlg: Dialogue) -> None:
        self.dlg = dlg
        self.rng = dlg.rng
        self.user = next(iter(dlg.db["users"].values()))
        self.auth_mode = self.rng.choice(("email", "name_zip"))
        self.upfront_auth = self.rng.random() < 0.75
        self.typo = self.auth_mode == "email" and self.rng.random() < 0.1

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
